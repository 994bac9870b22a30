"""Frames decoded before the model asks for them. A fresh `videoxl chat` process would otherwise load the
weights and only then start decoding the first question's video; `Prefetch` decodes it on a thread while the
weights load, and the question's `FrameStream` (`take`) hands over what was decoded, then the rest as it comes.

At most `ahead` frames wait in memory (uint8 384x384x3: 442 KB each, on the GPU with NVDEC); past that the
decoders pause until the question takes them.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

from videoxl.video.sources import FrameStream, open_video

BATCH = 16  # frames per handover: small, so the question's first slice is not held for a large batch
AHEAD = 1024  # ~450 MB of frames


class Prefetch:
    def __init__(self, video, sampling: tuple, device=None, ahead: int = AHEAD):
        self.path, self.sampling, self.device, self.ahead = os.path.abspath(video), tuple(sampling), device, ahead
        self.parts: list[tuple[list[int], object]] = []
        self.taken = 0  # frames the question has taken
        self.stream: FrameStream | None = None
        self.done, self.error = False, None
        self.cond, self.stop = threading.Condition(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="videoxl-prefetch", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.stream = open_video(self.path, *self.sampling, device=self.device)
            given = 0
            for frames in self.stream.batches(BATCH):
                with self.cond:
                    self.parts.append((self.stream.kept[given:given + len(frames)], frames))
                    given += len(frames)
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: given - self.taken < self.ahead or self.stop.is_set())
                if self.stop.is_set():
                    return
        except BaseException as e:  # raised in the question that takes these frames
            self.error = e
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def matches(self, video, sampling) -> bool:
        return isinstance(video, (str, os.PathLike)) and os.path.abspath(video) == self.path and \
            tuple(sampling) == self.sampling

    def cancel(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()

    def _next(self, i: int):
        """Part i, waiting for it; None once decoding ended without it."""
        with self.cond:
            self.cond.wait_for(lambda: i < len(self.parts) or self.done)
            if i < len(self.parts):
                return self.parts[i]
        if self.error is not None:
            raise self.error
        return None

    def _read(self, size: int):
        i, numbers, frames = 0, [], []
        while (part := self._next(i)) is not None:
            self.parts[i] = None  # the question holds them now
            i += 1
            numbers += part[0]
            frames.append(part[1])
            with self.cond:
                self.taken += len(part[0])
                self.cond.notify_all()
            while len(numbers) >= size or (numbers and self.done and i == len(self.parts)):
                joined = (torch.cat if torch.is_tensor(frames[0]) else np.concatenate)(frames)
                yield numbers[:size], joined[:size]
                numbers, frames = numbers[size:], [joined[size:]] if len(numbers) > size else []
        if numbers:
            yield numbers, (torch.cat if torch.is_tensor(frames[0]) else np.concatenate)(frames)

    def frame_stream(self) -> FrameStream:
        """The question's stream: the prefetched frames, in the batch size it asks for."""
        self._next(0)  # the header is read (or its error raised) before the question plans its memory
        s = self.stream
        replay = FrameStream(s.source, s.planned, s.video_fps, s.total_frames, self._read, stats=s.stats)

        def read(size):
            yield from self._read(size)
            replay.seconds = s.seconds  # variable-rate files: set by the decoders once they have read the index
        replay._read = read
        return replay


def take(model, video, sampling) -> FrameStream | None:
    """The frames `model.prefetched` decoded for this video and sampling, or None (a prefetch for another
    question is dropped)."""
    pre = getattr(model, "prefetched", None)
    if pre is None:
        return None
    model.prefetched = None
    if not pre.matches(video, sampling):
        pre.cancel()
        return None
    return pre.frame_stream()
