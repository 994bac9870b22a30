"""A decoding frame stream -> visual tokens, a slice of frames at a time, decoding and the GPU overlapped."""
from __future__ import annotations

import queue
import threading

import torch

from videoxl.progress import close, progress
from videoxl.timeline import Timeline
from videoxl.video.gpu import SideStream
from videoxl.video.stream import FrameStream
from videoxl.vision.encoder import VisionEncoder


def encode_stream(vision: VisionEncoder, stream: FrameStream, frames_per_slice: int, device: torch.device,
                  show_progress=False, timeline: Timeline | None = None) -> torch.Tensor:
    """Frames -> visual tokens [groups, tokens_per_group, hidden], `frames_per_slice` at a time, while a thread
    decodes the next slice (PyAV and PIL release the GIL while they work, so decoding and the GPU overlap).
    `timeline` records each batch's decoding and each slice's vision."""
    timeline = timeline or Timeline()
    batches: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def decode():
        try:
            frames_in = iter(stream.batches(frames_per_slice))
            while True:
                with timeline.span("decode"):
                    frames = next(frames_in, None)
                if frames is None:
                    break
                while not stop.is_set():
                    try:
                        batches.put(frames, timeout=0.1)
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
    parts, side = [], SideStream(device)
    try:
        while (item := batches.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            with timeline.gpu_span("vision", side.stream):
                parts.extend(side.run(lambda f: vision.encode(f, frames_per_slice), item))
            if bar is not None:
                bar.update(1)
    finally:
        stop.set()
        close(bar)
    worker.join(), side.join()
    return torch.cat(parts, dim=0)
