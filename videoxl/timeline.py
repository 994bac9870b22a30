"""When each stage of a question ran: (stage, start, end) in seconds from the question's start, kept in
`model.last_stats["timeline"]` so a benchmark can draw it and see which side held the other up.

Stages: "hash" (the file's content id, on its own thread), "decode" (one batch of frames out of the decoders),
"vision" (one slice through the vision tower), "prefill", "first_token" (question text to the first token),
"answer" (the rest of the tokens). On a GPU, vision and prefill are timed by CUDA events on the stream that ran
them (their kernels are queued ahead of the host), resolved when the question's prefix is built.
"""
from __future__ import annotations

import contextlib
import threading
import time

import torch


class Timeline:
    def __init__(self, device: torch.device | None = None):
        self.events: list[tuple[str, float, float]] = []
        self._pending: list[tuple[str, object, object]] = []
        self._lock = threading.Lock()
        self._ref = None
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # the reference event is reached now: GPU times map onto host times
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record(torch.cuda.current_stream(device))
        self.t0 = time.perf_counter()

    def add(self, stage: str, start: float, end: float) -> None:
        """A stage that ran from `start` to `end` (time.perf_counter() values)."""
        with self._lock:
            self.events.append((stage, round(start - self.t0, 4), round(end - self.t0, 4)))

    @contextlib.contextmanager
    def span(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, start, time.perf_counter())

    @contextlib.contextmanager
    def gpu_span(self, stage: str, stream=None):
        """A stage whose work is queued on `stream` (the current one by default); host-timed on the CPU."""
        if self._ref is None:
            with self.span(stage):
                yield
            return
        stream = stream or torch.cuda.current_stream()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            with self._lock:
                self._pending.append((stage, begin, end))

    def resolve(self) -> None:
        """Turn the CUDA events queued so far into times (waits for them)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for stage, begin, end in pending:
            end.synchronize()
            at = self.t0 + self._ref.elapsed_time(begin) / 1e3
            self.add(stage, at, at + begin.elapsed_time(end) / 1e3)


def merged(events, stages) -> list[tuple[float, float]]:
    """The union of the spans of `stages`, as disjoint (start, end) intervals in time order."""
    out: list[list[float]] = []
    for _, s, e in sorted((ev for ev in events if ev[0] in stages), key=lambda ev: ev[1]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def idle_waiting(events, busy=("vision",), feeding=("decode",)) -> float:
    """Seconds, between the first frames and the last vision slice, in which the `busy` stages did not run:
    the GPU waiting for frames."""
    work = merged(events, busy)
    ready = [e for stage, _, e in events if stage in feeding]
    if not ready or not work:
        return 0.0
    start, end = min(ready), work[-1][1]  # the first batch exists from here on
    covered = sum(min(e, end) - max(s, start) for s, e in work if e > start and s < end)
    return round(max(0.0, end - start - covered), 4)
