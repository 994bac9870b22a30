"""Frames into a live session: checked, sampled at the session's rate from their real times, resized, and held
until they make a whole group of 4 (the model reads frames in groups; `Time {t}s:` goes before each)."""
from __future__ import annotations

import math

import numpy as np

from videoxl.config import FRAMES_PER_GROUP
from videoxl.errors import VideoXLError
from videoxl.inputs import check_video
from videoxl.video.stream import resize_frame

EPS = 1e-6  # timestamps are floats read from containers: a sample due at 2.0 s must take a frame at 1.9999999


def as_frames(frames) -> list:
    """PIL images, HxWx3 arrays, or one [T,H,W,3] array / tensor -> a list of PIL images / uint8 arrays."""
    if isinstance(frames, (str, bytes)) or frames is None:
        raise VideoXLError("append takes frames (PIL images, HxWx3 arrays or a [T,H,W,3] array); for a file or "
                           "a stream use append_source")
    items = check_video(frames)
    if any(not hasattr(f, "shape") and not hasattr(f, "convert") for f in items):
        raise VideoXLError("append takes frames, not paths: open images first, or use append_source for video")
    return items


def check_timestamps(timestamps, count: int, after: float | None) -> list[float]:
    try:
        ts = [float(t) for t in timestamps]
    except (TypeError, ValueError):
        raise VideoXLError("timestamps must be a list of numbers (seconds)") from None
    if len(ts) != count:
        raise VideoXLError(f"{count} frames but {len(ts)} timestamps")
    if not all(math.isfinite(t) and t >= 0 for t in ts):
        raise VideoXLError("timestamps must be finite and >= 0 seconds")
    if any(b < a for a, b in zip(ts, ts[1:])):
        raise VideoXLError("timestamps must not decrease")
    if ts and after is not None and ts[0] <= after:
        raise VideoXLError(f"timestamps must go on after the session's last frame ({after:g} s); got {ts[0]:g} s")
    return ts


class Sampler:
    """Keeps a frame when it reaches the next due time: the first frame, then one per 1/fps on the grid that
    starts at the first frame (a 30 fps source at 1 fps gives frames 0, 30, 60, ...; a frame late by jitter
    does not shift the grid)."""

    def __init__(self, sample_fps: float):
        if isinstance(sample_fps, bool) or not isinstance(sample_fps, (int, float)) or not \
                math.isfinite(sample_fps) or sample_fps <= 0:
            raise VideoXLError(f"sample_fps must be a positive number, got {sample_fps!r}")
        self.period = 1.0 / sample_fps
        self.due: float | None = None  # next sample time
        self.last: float | None = None  # last frame seen (sampled or not)

    def default_times(self, count: int) -> list[float]:
        """Times for frames given without: one period after the last one seen (0.0 for the very first)."""
        first = 0.0 if self.last is None else self.last + self.period
        return [first + i * self.period for i in range(count)]

    def keep(self, times: list[float]) -> list[int]:
        kept = []
        for i, t in enumerate(times):
            if self.due is None or t >= self.due - EPS:
                kept.append(i)
                base = t if self.due is None else self.due
                self.due = base + self.period * (math.floor((t - base + EPS) / self.period) + 1)
            self.last = t
        return kept


def prepare(items: list, pool=None) -> np.ndarray:
    """Resize each kept frame to the model's 384x384 (as a video's frames are: no square padding), on `pool`'s
    threads when given: PIL resizes with the GIL released, and a 1080p frame takes 10-35 ms on one core, more than
    the GPU spends on it, so a serial resize would set a live session's ingest rate."""
    if not items:
        return np.zeros((0, 384, 384, 3), np.uint8)
    return np.stack(list(pool.map(resize_frame, items)) if pool is not None and len(items) > 1 else
                    [resize_frame(f) for f in items])


def whole_groups(pending: int) -> int:
    """Frames of `pending` that fill whole groups."""
    return pending - pending % FRAMES_PER_GROUP


def frame_time(t: float) -> float:
    """A frame's time as `Time {t}s:` prints it: seconds rounded to 0.1, as the reference does for videos."""
    return round(t, 1)
