"""Cancellation and time limits for one question: a `Cancel` is an event plus an optional deadline, checked by
every stage's loop (frame decoding, vision batches, prefill layers and blocks, the bi-level pass, the token
loop). A server sets it when the client goes away or the request's time runs out, so an abandoned question
stops at the next check instead of running to the end of its prefill and holding the worker.

    cancel = Cancel(timeout_s=30)      # or Cancel() and cancel.set() from another thread
    model.chat(video, tok, "...", cancel=cancel)   # raises Cancelled / TimedOut (both VideoXLError)
"""
from __future__ import annotations

import math
import threading
import time

from videoxl.errors import VideoXLError


class Cancelled(VideoXLError):
    """The question was cancelled (`Cancel.set()`) before it finished."""


class TimedOut(Cancelled):
    """The question ran past its deadline."""


class Cancel:
    def __init__(self, timeout_s: float | None = None, deadline: float | None = None):
        """`deadline` is a `time.monotonic()` value; `timeout_s` counts from now. Neither: no time limit."""
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or math.isnan(timeout_s):
                raise VideoXLError(f"timeout_s must be a number of seconds, got {timeout_s!r}")
            deadline = time.monotonic() + timeout_s
        self.event, self.deadline = threading.Event(), deadline

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        """Cancelled or past the deadline (what a loop that cannot raise, e.g. a decoding thread, polls)."""
        return self.event.is_set() or self.timed_out()

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def check(self) -> None:
        if self.event.is_set():
            raise Cancelled("cancelled")
        if self.timed_out():
            raise TimedOut("the question ran past its time limit")


def check(cancel: Cancel | None) -> None:
    """`cancel.check()` where a cancel was given."""
    if cancel is not None:
        cancel.check()


class Either:
    """Set when `event` or `cancel` is: the stop signal of a decoding thread that a consumer may also end."""

    def __init__(self, event: threading.Event, cancel: Cancel | None):
        self.event, self.cancel = event, cancel

    def is_set(self) -> bool:
        return self.event.is_set() or (self.cancel is not None and self.cancel.is_set())

    def set(self) -> None:
        self.event.set()


def next_batch(batches, cancel: Cancel | None, poll_s: float = 0.05):
    """`batches.get()` (a queue filled by a decoding thread), looking at `cancel` while it waits."""
    import queue

    if cancel is None:
        return batches.get()
    while True:
        cancel.check()
        try:
            return batches.get(timeout=poll_s)
        except queue.Empty:
            continue
