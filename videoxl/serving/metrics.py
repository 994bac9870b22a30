"""Prometheus text metrics (exposition format 0.0.4), kept by hand: a few counters, gauges and summaries.

A series is a name and its labels (the engine's carry `device` and `worker`: one series per worker; PromQL's
`sum without (device, worker)` gives the server's total)."""
from __future__ import annotations

import threading
from collections import defaultdict


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple, float] = defaultdict(float)
        self.sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])  # (name, labels) -> [sum, count]
        self.last: dict[tuple, float] = {}

    def count(self, name: str, value: float = 1, **labels) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, seconds: float, **labels) -> None:
        with self._lock:
            entry = self.sums[(name, tuple(sorted(labels.items())))]
            entry[0] += seconds
            entry[1] += 1

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self.last[(name, tuple(sorted(labels.items())))] = value

    def render(self, gauges: dict[tuple, float], help_text: dict[str, str]) -> str:
        """All metrics as text; `gauges` ((name, labels) -> value) are read at scrape time (queues, caches)."""
        with self._lock:
            families = [(self.counters, "counter", ""), ({**self.last, **gauges}, "gauge", ""),
                        *(({k: v[i] for k, v in self.sums.items()}, "summary", suffix)
                          for i, suffix in ((0, "_sum"), (1, "_count")))]
            rows = [(name, kind, suffix, labels, value) for series, kind, suffix in families
                    for (name, labels), value in series.items()]
        lines, seen = [], set()
        for name, kind, suffix, labels, value in sorted(rows, key=lambda r: (r[0], r[2], r[3])):
            if name not in seen:
                seen.add(name)
                lines.append(f"# HELP {name} {help_text.get(name, name)}")
                lines.append(f"# TYPE {name} {kind}")
            tag = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{suffix}{{{tag}}} {number(value)}" if tag else f"{name}{suffix} {number(value)}")
        return "\n".join(lines) + "\n"


def number(value: float) -> str:
    """Every digit: `:g` would print 1234567 tokens as 1.23457e+06."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


HELP = {
    "videoxl_requests_total": "Chat requests answered, by HTTP status",
    "videoxl_queue_depth": "Requests waiting for an engine worker",
    "videoxl_worker_up": "1 while the engine worker (one per device) is running, else 0",
    "videoxl_running_requests": "Requests an engine worker is running",
    "videoxl_time_to_first_token_seconds": "Arrival to first answer token, queueing included",
    "videoxl_prefill_seconds": "Worker start to first token: vision and prefill, or a cache load, plus the question",
    "videoxl_vision_seconds": "Video decoding and vision tower, for videos not in the KV cache",
    "videoxl_decode_seconds": "First to last answer token",
    "videoxl_prompt_tokens_total": "Prompt tokens of answered requests",
    "videoxl_cached_tokens_total": "Prompt tokens served from the video KV cache",
    "videoxl_completion_tokens_total": "Answer tokens generated",
    "videoxl_decode_tokens_per_second": "Answer tokens per second of decoding, last request",
    "videoxl_kv_cache_memory_hits": "Questions whose video KVs were in memory",
    "videoxl_kv_cache_disk_hits": "Questions whose video KVs were read from disk",
    "videoxl_kv_cache_misses": "Questions whose video KVs had to be built",
    "videoxl_kv_cache_vision_runs": "Times the vision tower and prefill ran on a video",
    "videoxl_kv_cache_evictions": "Video KV entries evicted from memory",
    "videoxl_kv_cache_bytes": "Bytes of video KVs held in memory",
    "videoxl_kv_cache_entries": "Videos whose KVs are held in memory",
    "videoxl_kv_cache_disk_writes": "Video KV entries written to disk",
    "videoxl_kv_cache_disk_rejected": "Disk entries refused on reading (corrupt or stale) and rebuilt",
}
