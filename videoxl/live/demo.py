"""The shapes task (videoxl/demo/shapes.py) played live: a feeder that appends a task video's 1-fps frames to a
session at a chosen speed, and the task's answers over what has been shown so far.

At a moment when the session covers its first F frames (1 fps: second i is frame i), the truth is the task's
answer over the scenes begun before F: "the shape at the end" is the current one, "how many rings" counts the
rings shown so far; the star's colour and digit, the shape after it and the shape at a given second exist only
once shown (None before).
"""
from __future__ import annotations

import threading
import time

import torch

from videoxl.demo import shapes

RENDER_CHUNK = 64  # seconds drawn at once


def truth_at(video: shapes.ShapesVideo, frames: int) -> dict[str, str | None]:
    """Per question kind (`video.questions`), the answer over the first `frames` seconds; None: not shown yet."""
    shown = [s for s in video.scenes if s.start < frames]
    star = next((i for i, s in enumerate(shown) if s.shape == "star"), None)
    out = {"needle": None if star is None else shown[star].colour, "first": shown[0].colour,
           "last": shown[-1].colour,
           "after": shown[star + 1].shape if star is not None and star + 1 < len(shown) else None}
    if video.version >= 2:  # the digit on the star, the rings shown so far, the shape at a second shown
        out["digit"] = None if star is None else str(shown[star].digit)
        out["count"] = str(sum(s.shape == "ring" for s in shown))
        if video.time_n >= 0:
            out["time"] = video.scene_at(video.time_n).colour if video.time_n < frames else None
    return out


def seconds_of(video: shapes.ShapesVideo, start: int, end: int):
    """uint8 [end - start, H, W, 3]: seconds [start, end) at 1 fps (file frames 2s, as `sample_fps=1` takes)."""
    return shapes.render(video, torch.arange(start, end) * shapes.FILE_FPS).numpy()


class DemoFeed(threading.Thread):
    """Appends `video` to `session` second by second at `speed` x real time (0: as fast as it goes)."""

    def __init__(self, session, video: shapes.ShapesVideo, speed: float = 10.0):
        super().__init__(name="videoxl-live-demo", daemon=True)
        self.session, self.video, self.speed = session, video, speed
        self.error: str | None = None
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            for start in range(0, self.video.seconds, RENDER_CHUNK):
                batch = seconds_of(self.video, start, min(start + RENDER_CHUNK, self.video.seconds))
                for k, frame in enumerate(batch):
                    if self.session.closed:
                        return
                    second = start + k
                    if self.speed > 0:
                        time.sleep(max(0.0, t0 + second / self.speed - time.monotonic()))
                    self.session.append(frame[None], [float(second)])
        except Exception as e:  # the session closed under us, or a limit: kept for the caller
            self.error = str(e)
        finally:
            self.done.set()
