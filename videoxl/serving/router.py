"""Which engine worker answers a request: a video's follow-ups go where its KVs are, new videos to the least loaded.

A worker's video KV cache lives in its own GPU's memory, so a follow-up question on a video (same content id, same
sampling, same system text: the parts of the cache key a request chooses) is sent to the worker that built the
video's KVs, even while that worker is still building them: the question then waits for the prefix instead of
paying vision and prefill a second time on another GPU. Any other request goes to the worker with the fewest
requests waiting or running; ties go to the worker holding fewer videos, then to the lowest index, so the choice is
deterministic for a given order of arrivals. A worker that is down is skipped; its videos move with their next
question (another worker reads them from the shared disk cache, or rebuilds them).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Sequence

from videoxl.serving.errors import APIError

REMEMBERED = 4096  # videos whose worker is remembered (least recently asked forgotten first): a few hundred KB


class Router:
    def __init__(self, workers: int, remembered: int = REMEMBERED):
        self.workers, self.remembered = workers, remembered
        self.homes: OrderedDict[Hashable, int] = OrderedDict()  # affinity key -> worker index
        self.held = [0] * workers  # how many remembered videos each worker holds
        self._lock = threading.Lock()

    def pick(self, key: Hashable | None, loads: Sequence[int], up: Sequence[bool]) -> int:
        """The worker for a request on `key` (None: no video to keep, e.g. nothing cacheable)."""
        with self._lock:
            home = self.homes.get(key) if key is not None else None
            if home is not None and up[home]:
                self.homes.move_to_end(key)
                return home
            alive = [i for i in range(self.workers) if up[i]]
            if not alive:
                raise APIError(503, "no engine worker is up")
            chosen = min(alive, key=lambda i: (loads[i], self.held[i], i))
            if key is not None:
                self._remember(key, chosen)
            return chosen

    def _remember(self, key: Hashable, worker: int) -> None:
        old = self.homes.pop(key, None)
        if old is not None:
            self.held[old] -= 1
        self.homes[key] = worker
        self.held[worker] += 1
        while len(self.homes) > self.remembered:
            _, gone = self.homes.popitem(last=False)
            self.held[gone] -= 1
