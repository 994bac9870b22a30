"""Engine workers: one thread per model replica (one per GPU), each fed by its own queue. A replica may live in a
process of its own (remote.py: every GPU after the first), its thread then relaying the question to it.

A request becomes a `Job`; the router (router.py) picks its worker (the one holding its video's KVs, else the
least loaded) and it waits in that worker's queue (`max_queue` waiting in all: HTTP 429). A worker runs the
model's own `stream_chat` (the same path as the Python API and the CLI: no second engine) and hands events back to the
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
from videoxl.serving.remote import RemoteModel, kv_gauges
from videoxl.serving.router import Router
from videoxl.serving.protocol import ChatRequest
from videoxl.cancel import Cancel, Cancelled, TimedOut
from videoxl.errors import VideoXLError, VideoXLMemoryError
from videoxl.live.session import LiveSession
from videoxl.settings import Settings
from videoxl.video.read import pin_to_cores
from videoxl.cache.identity import VideoRef

log = logging.getLogger("videoxl.serving")


@dataclass
class Job:
    request: ChatRequest
    video: VideoRef | LiveSession
    deadline: float  # time.monotonic() by which the answer must be done
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: Cancel = None  # set when the client goes away; times out at `deadline`: every stage checks it
    release: Callable[[], None] = lambda: None  # delete the request's temporary media
    arrived: float = field(default_factory=time.perf_counter)
    next_check: float = 0.0  # loop time of the next check that the client is still connected

    def __post_init__(self):
        if self.cancelled is None:
            self.cancelled = Cancel(deadline=self.deadline)

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


@dataclass
class Worker:
    """One model replica and the thread that runs its jobs, fed by its own queue (the router chooses it)."""
    index: int
    model: object
    tokenizer: object
    jobs: queue.Queue = field(default_factory=queue.Queue)
    running: int = 0
    thread: threading.Thread | None = None
    cores: list[int] | None = None  # the cores this worker's thread and its decoders run on (None: all)

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def labels(self) -> dict[str, str]:
        """Metric labels: the device, and the worker's index (two workers may share a device, e.g. cpu,cpu)."""
        return {"device": self.device, "worker": str(self.index)}

    @property
    def load(self) -> int:
        return self.jobs.qsize() + self.running

    @property
    def remote(self) -> bool:
        return isinstance(self.model, RemoteModel)

    def up(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and (not self.remote or self.model.alive())


def affinity_key(job: Job) -> tuple | None:
    """What a follow-up on the same video shares with its first question, among the cache key's parts a request
    chooses (the server's prefill settings are the same for every request); None: a video without a content id
    (nothing to keep: the least loaded worker)."""
    r = job.request
    return None if job.video.id is None else (job.video.id, tuple(r.sampling), r.system)


class Engine:
    def __init__(self, replicas: list[tuple], max_queue: int, metrics: Metrics, settings: Settings | None = None,
                 cores: list[int] | None = None):
        """`cores`: the in-process worker's share of the cores when the others run in processes of their own."""
        self.metrics, self.max_queue = metrics, max_queue
        self.settings = settings or Settings()  # prefill and bi-level settings; generation comes per request
        self.pool = [Worker(i, model, tok) for i, (model, tok) in enumerate(replicas)]
        if cores and self.pool and not self.pool[0].remote:
            self.pool[0].cores = cores
        for w in self.pool:
            w.thread = threading.Thread(target=self._work, args=(w,), name=f"videoxl-engine-{w.index}", daemon=True)
        self.router = Router(len(self.pool))
        self._lock = threading.Lock()  # the waiting count's check and the put, together

    @property
    def replicas(self) -> list[tuple]:
        """The replicas in this process (live sessions open on them: their frames arrive here)."""
        return [(w.model, w.tokenizer) for w in self.pool if not w.remote]

    @property
    def workers(self) -> list[threading.Thread]:
        return [w.thread for w in self.pool]

    def start(self) -> None:
        for w in self.pool:
            w.thread.start()

    def stop(self) -> None:
        """Finish the running jobs, refuse the waiting ones, write pending KV cache entries to disk."""
        for w in self.pool:
            while True:
                try:
                    job = w.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.emit("error", 503, "the server is shutting down")
                    job.release()
            w.jobs.put(None)
        for w in self.pool:
            if w.thread.ident is not None:  # started
                w.thread.join()
        for w in self.pool:
            if w.remote:
                w.model.close()  # the child flushes its cache's pending writes, then exits
            else:
                w.model.kv_cache.flush()

    def health(self) -> list[dict]:
        """Each worker: its device, whether its thread is up, and its requests waiting and running."""
        return [dict(w.labels, worker=w.index, up=w.up(), waiting=w.jobs.qsize(), running=w.running)
                for w in self.pool]

    def waiting(self) -> int:
        return sum(w.jobs.qsize() for w in self.pool)

    def submit(self, job: Job) -> Worker:
        """Queue the job on its worker (the video's, else the least loaded); 429 past `max_queue` waiting."""
        with self._lock:
            if self.waiting() >= self.max_queue:
                raise APIError(429, f"the server is busy ({self.max_queue} requests waiting); retry later")
            worker = self.pool[self.router.pick(affinity_key(job), [w.load for w in self.pool],
                                                [w.up() for w in self.pool])]
            worker.jobs.put_nowait(job)
        return worker

    def _work(self, worker: Worker) -> None:
        model = worker.model
        pin_to_cores(worker.cores, size_torch=False)  # torch's pool is the server process's, shared
        if model.device.type == "cuda" and not worker.remote:  # (a relay must not make a context on its GPU)
            torch.cuda.set_device(model.device)  # per thread: kernels launched without a device go to this GPU
        while (job := worker.jobs.get()) is not None:
            with self._lock:
                worker.running += 1
            try:
                self._run(worker, job)
            except TimedOut:
                job.emit("error", 504, "the answer took longer than the server's time limit")
            except Cancelled:
                pass  # the client went away: the HTTP side counts it
            except VideoXLMemoryError:
                job.emit("error", 503, "out of memory on the server; ask with fewer frames")
            except VideoXLError as e:
                job.emit("error", 400, str(e))
            except Exception as e:  # a bug or out of memory: this request fails, the worker carries on
                log.exception("request failed")
                oom = "out of memory" in str(e)  # never the exception's text: it may hold paths or internals
                job.emit("error", 503 if oom else 500,
                         "out of memory on the server; ask with fewer frames" if oom else "internal error")
            finally:
                job.release()
                with self._lock:
                    worker.running -= 1

    def _run(self, worker: Worker, job: Job) -> None:
        model, tokenizer = worker.model, worker.tokenizer
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.emit("error", 504, "the request waited past its time limit in the queue")
            return
        r, start = job.request, time.perf_counter()
        if isinstance(job.video, LiveSession):  # its own model (any worker may run it: the model's lock holds)
            model = job.video.model
            stream = job.video.stream_ask(r.question, r.generation, r.history, system=r.system,
                                          cancel=job.cancelled)
        else:
            stream = model.stream_chat(job.video, tokenizer, r.question, r.history, *r.sampling,
                                       generation_config=r.generation, settings=self.settings, system=r.system,
                                       cancel=job.cancelled)
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
        self._record(worker, job, stats, usage, start, first, end)
        job.emit("done", usage, finish)

    def _record(self, worker: Worker, job, stats, usage, start, first, end) -> None:
        m, on = self.metrics, worker.labels
        m.observe("videoxl_time_to_first_token_seconds", first - job.arrived, **on)
        m.observe("videoxl_prefill_seconds", first - start, **on)
        if "vision_s" in stats:
            m.observe("videoxl_vision_seconds", stats["vision_s"], **on)
        m.observe("videoxl_decode_seconds", end - first, **on)
        m.count("videoxl_prompt_tokens_total", usage["prompt_tokens"], **on)
        m.count("videoxl_cached_tokens_total", usage["prompt_tokens_details"]["cached_tokens"], **on)
        m.count("videoxl_completion_tokens_total", usage["completion_tokens"], **on)
        if end > first and usage["completion_tokens"] > 1:
            m.set("videoxl_decode_tokens_per_second", (usage["completion_tokens"] - 1) / (end - first), **on)

    def gauges(self) -> dict[tuple, float]:
        """Read at scrape time, one series per worker ((name, labels) -> value)."""
        out = {}
        for w in self.pool:
            on = tuple(sorted(w.labels.items()))
            values = {"videoxl_queue_depth": w.jobs.qsize(), "videoxl_running_requests": w.running,
                      "videoxl_worker_up": int(w.up()),
                      **(w.model.gauges if w.remote else kv_gauges(w.model.kv_cache))}
            out.update(((name, on), value) for name, value in values.items())
        return out
