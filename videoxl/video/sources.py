"""Video in: frame sampling (the reference's rules), stills, and the entry points that open and decode videos
(video_read: probing and choosing a decoder; video_decode: CPU workers; video_gpu: NVDEC).

Output is a `Clip`: frames already resized to the model's 384x384 (uint8, so an hour of video at a few hundred
frames stays small in RAM) and one timestamp per frame, in seconds rounded to 0.1 as the reference prints them.
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from videoxl.errors import VideoXLError
from videoxl.video.stream import IMAGE_SIZE, Clip, FrameStream, resize_frame  # noqa: F401  (re-exported)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
GREY = (127, 127, 127)  # LLaVA's square padding: the image mean 0.5 in 8 bits


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


def open_video(path, max_num_frames: int = 150, sample_fps: float | None = 1,
               max_sample_fps: float | None = None, decoder: str = "auto", device=None, mode: str = "exact",
               workers: int | None = None, on_damage: str = "error") -> FrameStream:
    """Check and sample a video file, a single image, a folder of images or a list of images; decode nothing
    yet (images excepted). Every problem with the input is raised here or, for a file that breaks mid-way,
    from `batches`. Decoders, modes, workers and damage handling: see video_read. `device` is where the
    frames are wanted (a CUDA device lets "auto" pick NVDEC); `stream.stats` tells what decoding cost."""
    check_sampling(max_num_frames, sample_fps, max_sample_fps)
    if isinstance(path, (list, tuple)):
        return FrameStream.from_clip(load_images(list(path), max_num_frames))
    if not isinstance(path, (str, os.PathLike)):
        raise VideoXLError(f"video must be a path or a list of images, got {type(path).__name__}")
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
    from videoxl.video.read import open_file

    def sampler(total, fps):
        return sample_frame_indices(total, fps, max_num_frames, sample_fps, max_sample_fps)

    return open_file(path, sampler, decoder, device, mode, workers, on_damage)


def load_video(path, max_num_frames: int = 150, sample_fps: float | None = 1,
               max_sample_fps: float | None = None, decoder: str = "auto", **options) -> Clip:
    """Sample and decode all frames at once (see `open_video` for decoding while encoding, and the options).
    Frames decoded on the GPU are copied back: the Clip holds numpy arrays."""
    stream = open_video(path, max_num_frames, sample_fps, max_sample_fps, decoder, **options)
    parts = [b if isinstance(b, np.ndarray) else b.cpu().numpy() for b in stream.batches(256)]
    return stream.clip(np.concatenate(parts))
