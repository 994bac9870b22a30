"""Prometheus text metrics (exposition format 0.0.4), kept by hand: a few counters, gauges and summaries."""
from __future__ import annotations

import threading
from collections import defaultdict


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple, float] = defaultdict(float)
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [sum, count]
        self.last: dict[str, float] = {}

    def count(self, name: str, value: float = 1, **labels) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            entry = self.sums[name]
            entry[0] += seconds
            entry[1] += 1

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.last[name] = value

    def render(self, gauges: dict[str, float], help_text: dict[str, str]) -> str:
        """All metrics as text; `gauges` are read at scrape time (queue depth, cache sizes)."""
        lines = []

        def head(name, kind):
            lines.append(f"# HELP {name} {help_text.get(name, name)}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            by_name: dict[str, list] = defaultdict(list)
            for (name, labels), value in sorted(self.counters.items()):
                by_name[name].append((labels, value))
            for name, rows in by_name.items():
                head(name, "counter")
                for labels, value in rows:
                    tag = ",".join(f'{k}="{v}"' for k, v in labels)
                    lines.append(f"{name}{{{tag}}} {value:g}" if tag else f"{name} {value:g}")
            for name, (total, n) in sorted(self.sums.items()):
                head(name, "summary")
                lines.append(f"{name}_sum {total:.6f}")
                lines.append(f"{name}_count {n}")
            merged = dict(self.last, **gauges)
        for name, value in sorted(merged.items()):
            head(name, "gauge")
            lines.append(f"{name} {value:g}")
        return "\n".join(lines) + "\n"


HELP = {
    "videoxl_requests_total": "Chat requests answered, by HTTP status",
    "videoxl_queue_depth": "Requests waiting for an engine worker",
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
