"""A decoding frame stream -> visual tokens, a slice of frames at a time, decoding and the GPU overlapped."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from videoxl.cancel import Cancel, next_batch
from videoxl.progress import close, progress
from videoxl.timeline import Timeline
from videoxl.video.gpu import SideStream
from videoxl.video.stream import FrameStream
from videoxl.vision.encoder import VisionEncoder


@dataclass
class Slice:
    """One slice's visual tokens [groups, tokens_per_group, hidden], its frames' timestamps, and whether more
    decoded frames were already waiting when it was handed out (the caller may then batch its next step)."""
    visual: torch.Tensor
    timestamps: list[float]
    more_waiting: bool


def encode_slices(vision: VisionEncoder, stream: FrameStream, frames_per_slice: int, device: torch.device,
                  show_progress=False, timeline: Timeline | None = None,
                  cancel: Cancel | None = None) -> Iterator[Slice]:
    """Frames -> visual tokens, `frames_per_slice` frames at a time, while a thread decodes the next slice
    (PyAV and PIL release the GIL while they work, so decoding and the GPU overlap). Each slice is yielded as
    soon as it is encoded, ordered on the current CUDA stream after the tower's work, so the caller can prefill
    it while later frames are still being decoded. `timeline` records each batch's decoding and each slice's
    vision."""
    timeline = timeline or Timeline()
    batches: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def decode():
        try:
            frames_in = iter(stream.batches(frames_per_slice, cancel))
            while True:
                kept = len(stream.kept)
                with timeline.span("decode"):
                    frames = next(frames_in, None)
                if frames is None:
                    break
                item = (frames, stream.timestamps_from(kept))  # this batch's times (kept grows before a yield)
                while not stop.is_set():
                    try:
                        batches.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            batches.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            batches.put(e)

    worker = threading.Thread(target=decode, name="videoxl-decode", daemon=True)
    worker.start()
    bar = progress(None, -(-len(stream.planned) // frames_per_slice), "vision", show_progress)
    side = SideStream(device)
    try:
        while (item := next_batch(batches, cancel)) is not None:
            if isinstance(item, BaseException):
                raise item
            frames, times = item
            with timeline.gpu_span("vision", side.stream):
                parts = side.run(lambda f: vision.encode(f, frames_per_slice, cancel), frames)
            side.join()  # the caller's kernels on the current stream come after the tower's
            if bar is not None:
                bar.update(1)
            yield Slice(torch.cat(parts, dim=0), times, not batches.empty())
    finally:
        stop.set()
        close(bar)
        side.join()
    worker.join()


def encode_stream(vision: VisionEncoder, stream: FrameStream, frames_per_slice: int, device: torch.device,
                  show_progress=False, timeline: Timeline | None = None,
                  cancel: Cancel | None = None) -> torch.Tensor:
    """All of a stream's visual tokens [groups, tokens_per_group, hidden] (see `encode_slices`)."""
    return torch.cat([s.visual for s in encode_slices(vision, stream, frames_per_slice, device, show_progress,
                                                      timeline, cancel)], dim=0)
