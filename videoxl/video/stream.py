"""The frames a question reads: a decoded `Clip`, or a `FrameStream` that decodes as it is read, and the resize
every frame goes through on the CPU (PIL bicubic to 384x384, what the reference's processor does)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

IMAGE_SIZE = 384


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [n, 384, 384, 3]
    timestamps: list[float]
    indices: list[int] = field(default_factory=list)  # frame numbers in the source (videos only)
    source: str = ""
    video_fps: float = 0.0
    total_frames: int = 0

    def __len__(self) -> int:
        return len(self.frames)


def resize_frame(frame: np.ndarray) -> np.ndarray:
    """Any RGB frame -> uint8 384x384x3, bicubic through PIL (what the reference's processor does)."""
    img = Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame
    return np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))


@dataclass
class FrameStream:
    """A sampled video whose frames are decoded as they are read, `size` at a time (`batches`), so the vision
    tower can encode one batch while the next is being decoded. Once read, `clip()` tells what was decoded: a
    truncated file may hold fewer frames than its header announced, and only those that exist are kept."""

    source: str
    planned: list[int]  # frame numbers to take, ascending
    video_fps: float
    total_frames: int
    _read: Callable[[int], Iterator[tuple[list[int], np.ndarray]]]  # size -> (frame numbers, frames) batches
    kept: list[int] = field(default_factory=list)
    timestamps_override: list[float] | None = None  # still images: 0.0, 1.0, ... whatever their number
    stats: dict = field(default_factory=dict)  # decoder, decode_s, source_frames_read, ... once read
    seconds: Callable[[int], float] | None = None  # real time of frame k (variable-rate files)
    cancel: object = None  # a videoxl.cancel.Cancel while `batches` runs: decoders inside stop on it too

    def batches(self, size: int, cancel=None) -> Iterator[np.ndarray]:
        from videoxl.cancel import check

        self.cancel = cancel
        check(cancel)
        for numbers, frames in self._read(size):
            check(cancel)
            self.kept += numbers
            yield frames

    @property
    def timestamps(self) -> list[float]:
        return self.timestamps_from(0)

    def timestamps_from(self, start: int) -> list[float]:
        """The timestamps of the kept frames from the `start`-th on (a batch's, without the ones before it)."""
        if self.timestamps_override is not None:
            return self.timestamps_override[start:len(self.kept)]
        if self.seconds is not None:
            return [round(self.seconds(i), 1) for i in self.kept[start:]]
        return [round(i / self.video_fps, 1) for i in self.kept[start:]]

    def clip(self, frames: np.ndarray) -> Clip:
        return Clip(frames, self.timestamps, list(self.kept), self.source, self.video_fps, self.total_frames)

    @classmethod
    def from_clip(cls, clip: Clip) -> "FrameStream":
        def read(size):
            for s in range(0, len(clip), size):
                yield list(range(s, min(s + size, len(clip)))), clip.frames[s:s + size]
        return cls(clip.source, list(range(len(clip))), clip.video_fps or 1.0, len(clip), read,
                   timestamps_override=list(clip.timestamps))


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
