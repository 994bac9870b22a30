"""The interpreter's GIL switch interval while decoder threads run beside the GPU work.

Frames are decoded on many threads (12 NVDEC sessions and up to 14 CPU decoders) while the question's thread
launches the vision tower's and the prefill's kernels, one Python call each. Each side needs the GIL between
its C calls. With CPython's default switch interval (5 ms), a thread that asks for the GIL waits up to that long
per hand-over, and on the H200 the launching thread fell far behind (bench/extend_profile.py, 2026-11-30: an
hour's prompt prefilled in 16 extensions took 7.9 s of GPU span alone and 32.5 s with a file decoded beside,
the host's time inside the calls 32.5 s; with 4 spinning Python threads one pass took 126 s instead of 6.3).
A shorter interval hands the GIL over sooner. It is process-wide, so it is lowered only while some decoding
runs here and put back when the last one ends."""
from __future__ import annotations

import contextlib
import sys
import threading

SWITCH_INTERVAL_S: float | None = 0.0002  # while decoding; None leaves the interpreter's own
_lock = threading.Lock()
_users = 0
_saved = 0.0


@contextlib.contextmanager
def short_switches():
    """Lower the switch interval to SWITCH_INTERVAL_S for the block (nested and concurrent blocks share one
    lowering; the interpreter's value comes back after the last)."""
    global _users, _saved
    if SWITCH_INTERVAL_S is None:
        yield
        return
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved, SWITCH_INTERVAL_S))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.setswitchinterval(_saved)
