"""A model replica in a process of its own: what `serve --devices cuda:0,cuda:1` runs for every device after the
first.

Why: two GPUs' workers as threads of one process decode frames at about half the speed of two processes (measured
on an `nvidia-h200-x2` host, 2026-11-30, `bench/nvdec_contention.py`: 600 frames of a 10-minute 1080p file with
NVDEC, alone 4.4 s; two GPUs from two threads 8.0 / 8.6 s; from two processes 4.9 / 4.6 s), and the server's two
workers answered at 10 s a video against 5.8 s alone. Whatever they share in one process (the GIL over 24
decoder threads, the driver's per-process locks), a process per GPU does not share it.

The engine's worker thread stays in the server process and relays: `RemoteModel.stream_chat` sends the question
to the child, yields the text pieces it sends back, and forwards a cancellation (client gone, time limit) at once,
even while the child is still decoding frames or prefilling. Errors come back as the exceptions the engine
already maps to HTTP statuses. Live sessions stay on the in-process replica (their frames arrive in this
process). The disk KV cache is shared through its folder, as between threads.
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
import time

import torch

from videoxl.cancel import Cancel, Cancelled, TimedOut
from videoxl.errors import VideoXLError, VideoXLMemoryError

log = logging.getLogger("videoxl.serving")
POLL_S = 0.05  # how often a waiting relay looks at its job's cancel flag
# an error's kind across the pipe, most specific class first (TimedOut is a Cancelled, both are VideoXLErrors)
ERRORS = {"timeout": TimedOut, "cancelled": Cancelled, "memory": VideoXLMemoryError, "input": VideoXLError}


def kv_gauges(cache) -> dict:
    """The video KV cache's gauges (one C call copies the entries: safe against the worker changing them)."""
    entries = list(cache.entries.values())
    return {**{f"videoxl_kv_cache_{name}": value for name, value in dict(cache.counts).items()},
            "videoxl_kv_cache_bytes": sum(e.nbytes for e in entries), "videoxl_kv_cache_entries": len(entries),
            "videoxl_kv_cache_disk_writes": cache.disk.writes if cache.disk else 0,
            "videoxl_kv_cache_disk_rejected": cache.disk.rejected if cache.disk else 0}


def _child(load_kwargs: dict, requests, events, cores: list[int] | None = None) -> None:
    """The child's life: load, say ready (or why not), then answer one question at a time until told to stop."""
    import videoxl
    from videoxl.video.read import pin_to_cores, usable_core_ids

    pin_to_cores(cores)  # its slice of the server's cores, as `batch` gives each worker process
    try:
        model, tokenizer = videoxl.load(**load_kwargs)
    except BaseException as e:  # the parent reports it and keeps the other workers
        events.send(("failed", str(e).splitlines()[0][:300] if isinstance(e, VideoXLError) else repr(e)[:300]))
        return
    events.send(("ready", str(model.device), kv_gauges(model.kv_cache), usable_core_ids()))
    cancel, lock = None, threading.Lock()
    jobs = []
    arrived = threading.Condition()

    def listen():  # cancellations must reach the question while it runs: a thread of their own
        while True:
            try:
                msg = requests.recv()
            except (EOFError, OSError):
                msg = ("stop",)
            if msg[0] == "cancel":
                with lock:
                    if cancel is not None:
                        cancel.set()
                continue
            with arrived:
                jobs.append(msg)
                arrived.notify()
            if msg[0] == "stop":
                return

    threading.Thread(target=listen, name="videoxl-remote-listen", daemon=True).start()
    while True:
        with arrived:
            arrived.wait_for(lambda: jobs)
            msg = jobs.pop(0)
        if msg[0] == "stop":
            model.kv_cache.flush()
            events.send(("stopped",))
            return
        _, kwargs, deadline = msg
        with lock:
            cancel = Cancel(deadline=deadline)
        events.send(_answer(model, tokenizer, kwargs, cancel, events))


def _answer(model, tokenizer, kwargs: dict, cancel: Cancel, events) -> tuple:
    """Run one question, sending each text piece; the closing event (done or error) is returned."""
    try:
        stream = model.stream_chat(kwargs.pop("video"), tokenizer, cancel=cancel, **kwargs)
        try:
            for piece in stream:
                events.send(("text", piece))
                if cancel.is_set():
                    break
        finally:
            stream.close()
        return ("done", dict(model.last_stats), kv_gauges(model.kv_cache))
    except VideoXLError as e:  # sent as its kind, raised again as the same class in the parent
        return ("error", next(kind for kind, cls in ERRORS.items() if isinstance(e, cls)), str(e))
    except Exception as e:  # a bug or out of memory: logged here, the parent sends a 500/503 without internals
        log.exception("request failed in the worker process")
        return ("error", "memory" if "out of memory" in str(e) else "internal", "")


class RemoteModel:
    """The part of a model the engine's worker uses (`stream_chat`, `last_stats`, `device`, gauges), answered by
    a child process that holds the real model on `device`."""

    def __init__(self, load_kwargs: dict, cores: list[int] | None = None):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that has CUDA and threads
        self._requests, child_requests = ctx.Pipe(duplex=False)[::-1]
        child_events, self._events = ctx.Pipe(duplex=False)[::-1]
        self.device = torch.device(load_kwargs["device"])
        self.process = ctx.Process(target=_child, args=(load_kwargs, child_requests, child_events, cores),
                                   name=f"videoxl-worker-{self.device}", daemon=True)
        self.process.start()
        child_requests.close()
        child_events.close()
        self.last_stats: dict = {}
        self.gauges: dict = {}
        self.cores: list[int] | None = None

    def wait_ready(self) -> None:
        msg = self._recv()
        if msg[0] != "ready":
            raise VideoXLError(f"the worker on {self.device} could not load the model: {msg[1]}")
        self.gauges, self.cores = msg[2], msg[3]  # the cores the child runs on

    def alive(self) -> bool:
        return self.process.is_alive()

    def _send(self, msg: tuple) -> None:
        try:
            self._requests.send(msg)
        except (OSError, EOFError):  # a broken pipe: the child is gone
            raise RuntimeError(f"the worker process on {self.device} exited (code {self.process.exitcode})") \
                from None

    def _recv(self, cancel: Cancel | None = None, sent_cancel: list | None = None):
        while not self._events.poll(POLL_S):
            if not self.process.is_alive():
                raise RuntimeError(f"the worker process on {self.device} exited (code {self.process.exitcode})")
            if cancel is not None and cancel.is_set() and not sent_cancel:
                self._send(("cancel",))
                sent_cancel.append(True)
        try:
            return self._events.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the worker process on {self.device} exited") from None

    def stream_chat(self, video, tokenizer, question, chat_history=None, max_num_frames=150, sample_fps=1,
                    max_sample_fps=None, generation_config=None, settings=None, *, system=None, cancel=None):
        kwargs = dict(video=video, question=question, chat_history=chat_history, max_num_frames=max_num_frames,
                      sample_fps=sample_fps, max_sample_fps=max_sample_fps, generation_config=generation_config,
                      settings=settings, system=system)
        cancel = cancel or Cancel()
        self._send(("ask", kwargs, cancel.deadline))
        sent_cancel: list = []
        finished = False
        try:
            while True:
                msg = self._recv(cancel, sent_cancel)
                if msg[0] == "text":
                    yield msg[1]
                    continue
                finished = True
                if msg[0] == "done":
                    self.last_stats, self.gauges = msg[1], msg[2]
                    return
                if msg[1] == "internal":
                    raise RuntimeError("internal error in the worker process")
                raise ERRORS[msg[1]](msg[2] or "out of memory")
        finally:
            if not finished and self.process.is_alive():  # closed early: stop the child, then drain to its end
                if not sent_cancel:
                    self._send(("cancel",))
                while (msg := self._recv())[0] == "text":
                    pass
                if msg[0] == "done":
                    self.last_stats, self.gauges = msg[1], msg[2]

    def close(self, timeout: float = 60.0) -> None:
        """Stop the child once its running question ends, its pending disk writes flushed."""
        if self.process.is_alive():
            try:
                self._requests.send(("stop",))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.process.is_alive():
                    if self._events.poll(POLL_S) and self._events.recv()[0] == "stopped":
                        break
            except (EOFError, OSError, BrokenPipeError):
                pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
