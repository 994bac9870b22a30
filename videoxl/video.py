"""Video in: frame sampling (the reference's rules), decoding (PyAV; decord if asked and installed), stills.

Output is a `Clip`: frames already resized to the model's 384x384 (uint8, so an hour of video at a few hundred
frames stays small in RAM) and one timestamp per frame, in seconds rounded to 0.1 as the reference prints them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .errors import VideoXLError

IMAGE_SIZE = 384
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
GREY = (127, 127, 127)  # LLaVA's square padding: the image mean 0.5 in 8 bits


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


def check_sampling(max_num_frames, sample_fps, max_sample_fps) -> None:
    if isinstance(max_num_frames, bool) or not isinstance(max_num_frames, int) or max_num_frames <= 0:
        raise VideoXLError(f"max_num_frames must be a positive integer, got {max_num_frames!r}")
    for name, value in (("sample_fps", sample_fps), ("max_sample_fps", max_sample_fps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise VideoXLError(f"{name} must be a positive number or None, got {value!r}")


def sample_frame_indices(total_frames: int, video_fps: float, max_num_frames: int,
                         sample_fps: float | None = 1, max_sample_fps: float | None = None) -> list[int]:
    """Which frames to take, by the reference's rules (`load_video` in its evaluation wrapper).

    Take every round(video_fps / sample_fps)-th frame; with `max_sample_fps`, raise the rate to
    min(max_num_frames // count, max_sample_fps) when that is higher; if more than `max_num_frames` remain,
    fall back to `max_num_frames` evenly spaced frames. `sample_fps=None` means uniform sampling.
    Unlike the reference, a step that rounds to 0 (video slower than half the asked rate) becomes 1.
    """
    if sample_fps is None:
        return np.linspace(0, total_frames - 1, min(max_num_frames, total_frames), dtype=int).tolist()
    step = max(1, round(video_fps / sample_fps))
    indices = list(range(0, total_frames, step))
    if max_sample_fps is not None:
        higher = min(max_num_frames // len(indices), max_sample_fps)
        if higher > sample_fps:
            indices = list(range(0, total_frames, max(1, round(video_fps / higher))))
    if len(indices) > max_num_frames:
        indices = np.linspace(0, total_frames - 1, max_num_frames, dtype=int).tolist()
    return indices


def resize_frame(frame: np.ndarray) -> np.ndarray:
    """Any RGB frame -> uint8 384x384x3, bicubic through PIL (what the reference's processor does)."""
    img = Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame
    return np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))


def pad_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), GREY)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def load_images(images: list, max_num_frames: int) -> Clip:
    """Still images (paths, PIL images or HxWx3 uint8 arrays): grey-padded to square, then treated as frames
    at timestamps 0.0, 1.0, ... (the reference's convention). More than `max_num_frames`: evenly subsampled."""
    if not images:
        raise VideoXLError("no images given")
    keep = np.linspace(0, len(images) - 1, min(max_num_frames, len(images)), dtype=int).tolist()
    frames = []
    for i in keep:
        item = images[i]
        try:
            if isinstance(item, (str, os.PathLike)):
                with Image.open(item) as f:
                    img = f.convert("RGB")
            elif isinstance(item, np.ndarray):
                if item.ndim != 3 or item.shape[2] != 3:
                    raise VideoXLError(f"image arrays must be HxWx3, got shape {item.shape}")
                img = Image.fromarray(item.astype(np.uint8))
            elif isinstance(item, Image.Image):
                img = item.convert("RGB")
            else:
                raise VideoXLError(f"unsupported image type: {type(item).__name__}")
        except (OSError, ValueError) as e:
            raise VideoXLError(f"cannot read image {item if isinstance(item, str) else i}: {e}") from None
        frames.append(resize_frame(pad_square(img)))
    return Clip(np.stack(frames), [float(i) for i in range(len(frames))], source="images")


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

    def batches(self, size: int) -> Iterator[np.ndarray]:
        for numbers, frames in self._read(size):
            self.kept += numbers
            yield frames

    @property
    def timestamps(self) -> list[float]:
        if self.timestamps_override is not None:
            return self.timestamps_override[:len(self.kept)]
        return [round(i / self.video_fps, 1) for i in self.kept]

    def clip(self, frames: np.ndarray) -> Clip:
        return Clip(frames, self.timestamps, list(self.kept), self.source, self.video_fps, self.total_frames)

    @classmethod
    def from_clip(cls, clip: Clip) -> "FrameStream":
        def read(size):
            for s in range(0, len(clip), size):
                yield list(range(s, min(s + size, len(clip)))), clip.frames[s:s + size]
        return cls(clip.source, list(range(len(clip))), clip.video_fps or 1.0, len(clip), read,
                   timestamps_override=list(clip.timestamps))


def open_video(path, max_num_frames: int = 150, sample_fps: float | None = 1,
               max_sample_fps: float | None = None, decoder: str = "pyav") -> FrameStream:
    """Check and sample a video file, a single image, a folder of images or a list of images; decode nothing
    yet (images excepted). Every problem with the input is raised here or, for a file that breaks mid-way,
    from `batches`."""
    check_sampling(max_num_frames, sample_fps, max_sample_fps)
    if isinstance(path, (list, tuple)):
        return FrameStream.from_clip(load_images(list(path), max_num_frames))
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoXLError(f"video not found: {path}")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        if not files:
            raise VideoXLError(f"folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): {path}")
        return FrameStream.from_clip(load_images(files, max_num_frames))
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return FrameStream.from_clip(load_images([path], max_num_frames))
    if os.path.getsize(path) == 0:
        raise VideoXLError(f"video file is empty (0 bytes): {path}")
    if decoder == "decord":
        return _open_decord(path, max_num_frames, sample_fps, max_sample_fps)
    if decoder != "pyav":
        raise VideoXLError(f"decoder must be 'pyav' or 'decord', got {decoder!r}")
    return _open_pyav(path, max_num_frames, sample_fps, max_sample_fps)


def load_video(path, max_num_frames: int = 150, sample_fps: float | None = 1,
               max_sample_fps: float | None = None, decoder: str = "pyav") -> Clip:
    """Sample and decode all frames at once (see `open_video` for decoding while encoding)."""
    stream = open_video(path, max_num_frames, sample_fps, max_sample_fps, decoder)
    return stream.clip(np.concatenate(list(stream.batches(256))))


def _open_pyav(path, max_num_frames, sample_fps, max_sample_fps) -> FrameStream:
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoXLError(f"not a readable video: {path} ({_short(e)})") from None
    try:
        if not container.streams.video:
            raise VideoXLError(f"file has no video stream: {path}")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 0.0
        if video_fps <= 0:
            raise VideoXLError(f"video has no frame rate, cannot place timestamps: {path}")
        total = stream.frames
        if total <= 0:  # some containers do not record a count: count packets, no decoding needed
            try:
                total = sum(1 for p in container.demux(stream) if p.size)
            except av.FFmpegError as e:
                raise VideoXLError(f"corrupt video: {path} ({_short(e)})") from None
            container.seek(0)
        if total <= 0:
            raise VideoXLError(f"video has no frames: {path}")
    except BaseException:
        container.close()
        raise
    indices = sample_frame_indices(total, video_fps, max_num_frames, sample_fps, max_sample_fps)

    def read(size):
        wanted, last = set(indices), indices[-1]
        numbers, frames, decoded = [], [], 0
        with container:
            stream.thread_type = "AUTO"
            try:
                for n, frame in enumerate(container.decode(stream)):
                    if n in wanted:
                        numbers.append(n)
                        frames.append(resize_frame(frame.to_ndarray(format="rgb24")))
                        if len(frames) == size:
                            decoded += size
                            yield numbers, np.stack(frames)
                            numbers, frames = [], []
                    if n >= last:
                        break
            except av.FFmpegError as e:  # truncated or damaged: keep what was decoded before
                if not decoded and not frames:
                    raise VideoXLError(f"corrupt video, no frame could be decoded: {path} ({_short(e)})") from None
        if frames:
            yield numbers, np.stack(frames)
        elif not decoded:
            raise VideoXLError(f"corrupt video, no frame could be decoded: {path}")

    return FrameStream(path, indices, video_fps, total, read)


def _open_decord(path, max_num_frames, sample_fps, max_sample_fps) -> FrameStream:
    try:
        from decord import VideoReader, cpu
    except ImportError:
        raise VideoXLError("decoder 'decord' is not installed (pip install decord), use 'pyav'") from None
    try:
        vr = VideoReader(path, ctx=cpu(0))
    except Exception as e:  # decord raises its own untyped errors
        raise VideoXLError(f"not a readable video: {path} ({_short(e)})") from None
    fps = vr.get_avg_fps()
    if len(vr) == 0 or fps <= 0:
        raise VideoXLError(f"video has no frames or no frame rate: {path}")
    indices = sample_frame_indices(len(vr), fps, max_num_frames, sample_fps, max_sample_fps)

    def read(size):
        for s in range(0, len(indices), size):
            part = indices[s:s + size]
            yield part, np.stack([resize_frame(f) for f in vr.get_batch(part).asnumpy()])

    return FrameStream(path, indices, fps, len(vr), read)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
