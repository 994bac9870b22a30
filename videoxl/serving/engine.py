"""Engine workers: one thread per model replica (one per GPU), fed by one bounded queue.

A request becomes a `Job` and waits in the queue (full queue: HTTP 429). A worker runs the model's own
`stream_chat` (the same path as the Python API and the CLI: no second engine) and hands events back to the
request's event loop: ("delta", text), ("done", usage, finish_reason), ("error", status, message). Between
tokens it checks whether the client went away or the time limit passed, and stops generating if so.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from videoxl.serving.errors import APIError
from videoxl.serving.metrics import Metrics
from videoxl.serving.protocol import ChatRequest
from videoxl.errors import VideoXLError
from videoxl.live.session import LiveSession
from videoxl.settings import Settings
from videoxl.cache.identity import VideoRef

log = logging.getLogger("videoxl.serving")


@dataclass
class Job:
    request: ChatRequest
    video: VideoRef | LiveSession
    deadline: float  # time.monotonic() by which the answer must be done
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    release: Callable[[], None] = lambda: None  # delete the request's temporary media
    arrived: float = field(default_factory=time.perf_counter)
    next_check: float = 0.0  # loop time of the next check that the client is still connected

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


def stop_cut(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (not sent until we know)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class Engine:
    def __init__(self, replicas: list[tuple], max_queue: int, metrics: Metrics, settings: Settings | None = None):
        self.replicas, self.metrics = replicas, metrics
        self.settings = settings or Settings()  # prefill and bi-level settings; generation comes per request
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.running = 0
        self._running_lock = threading.Lock()
        self.workers = [threading.Thread(target=self._work, args=(model, tok), name=f"videoxl-engine-{i}",
                                         daemon=True) for i, (model, tok) in enumerate(replicas)]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        """Finish the running jobs, refuse the waiting ones, write pending KV cache entries to disk."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", 503, "the server is shutting down")
                job.release()
        for _ in self.workers:
            self.jobs.put(None)
        for w in self.workers:
            w.join()
        for model, _ in self.replicas:
            model.kv_cache.flush()

    def healthy(self) -> bool:
        return all(w.is_alive() for w in self.workers)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy ({self.jobs.maxsize} requests waiting); retry later") from None

    def _work(self, model, tokenizer) -> None:
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)  # per thread: kernels launched without a device go to this GPU
        while (job := self.jobs.get()) is not None:
            with self._running_lock:
                self.running += 1
            try:
                self._run(model, tokenizer, job)
            except VideoXLError as e:
                job.emit("error", 400, str(e))
            except Exception as e:  # a bug or out of memory: this request fails, the worker carries on
                log.exception("request failed")
                oom = "out of memory" in str(e)
                job.emit("error", 503 if oom else 500,
                         "out of memory on the server; ask with fewer frames" if oom else f"internal error: {e}")
            finally:
                job.release()
                with self._running_lock:
                    self.running -= 1

    def _run(self, model, tokenizer, job: Job) -> None:
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.emit("error", 504, "the request waited past its time limit in the queue")
            return
        r, start = job.request, time.perf_counter()
        if isinstance(job.video, LiveSession):  # its own model (any worker may run it: the model's lock holds)
            model = job.video.model
            stream = job.video.stream_ask(r.question, r.generation, r.history)
        else:
            stream = model.stream_chat(job.video, tokenizer, r.question, r.history, *r.sampling,
                                       generation_config=r.generation, settings=self.settings)
        text, sent, first, finish = "", 0, None, None
        try:
            for piece in stream:
                first = first or time.perf_counter()
                text += piece
                cut = stop_cut(text, r.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                ready = len(text) - held_back(text, r.stop)
                if ready > sent:
                    job.emit("delta", text[sent:ready])
                    sent = ready
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if time.monotonic() > job.deadline:
                    finish = "timeout"
                    break
        finally:
            stream.close()  # frees the model for the next job
        end = time.perf_counter()
        first = first or end
        stats = dict(model.last_stats)
        if finish == "cancelled":
            return  # the HTTP side counts it
        if finish == "timeout":
            job.emit("error", 504, "the answer took longer than the server's time limit")
            return
        if len(text) > sent:
            job.emit("delta", text[sent:])
        completion = stats.get("generated_tokens", 0)
        if finish is None:
            finish = "length" if completion >= r.generation["max_new_tokens"] else "stop"
        usage = {"prompt_tokens": stats.get("prompt_tokens", 0), "completion_tokens": completion,
                 "total_tokens": stats.get("prompt_tokens", 0) + completion,
                 "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)}}
        self._record(job, stats, usage, start, first, end)
        job.emit("done", usage, finish)

    def _record(self, job, stats, usage, start, first, end) -> None:
        m = self.metrics
        m.observe("videoxl_time_to_first_token_seconds", first - job.arrived)
        m.observe("videoxl_prefill_seconds", first - start)
        if "vision_s" in stats:
            m.observe("videoxl_vision_seconds", stats["vision_s"])
        m.observe("videoxl_decode_seconds", end - first)
        m.count("videoxl_prompt_tokens_total", usage["prompt_tokens"])
        m.count("videoxl_cached_tokens_total", usage["prompt_tokens_details"]["cached_tokens"])
        m.count("videoxl_completion_tokens_total", usage["completion_tokens"])
        if end > first and usage["completion_tokens"] > 1:
            m.set("videoxl_decode_tokens_per_second", (usage["completion_tokens"] - 1) / (end - first))

    def gauges(self) -> dict[str, float]:
        out = {"videoxl_queue_depth": self.jobs.qsize(), "videoxl_running_requests": self.running}
        for model, _ in self.replicas:
            cache = model.kv_cache
            entries = list(cache.entries.values())  # one C call: safe against the worker changing the dict
            for name, value in dict(cache.counts).items():
                key = f"videoxl_kv_cache_{name}"
                out[key] = out.get(key, 0) + value
            for key, value in (("bytes", sum(e.nbytes for e in entries)), ("entries", len(entries)),
                               ("disk_writes", cache.disk.writes if cache.disk else 0),
                               ("disk_rejected", cache.disk.rejected if cache.disk else 0)):
                out[f"videoxl_kv_cache_{key}"] = out.get(f"videoxl_kv_cache_{key}", 0) + value
        return out
