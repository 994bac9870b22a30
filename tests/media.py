"""Synthetic media for tests: small videos written with PyAV, plus broken files.

Everything here is tiny (64x48 by default) so that tests that decode real files stay fast.
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


def frame_pixels(n: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """The RGB content of frame n: a fixed gradient, an n-dependent colour shift and a moving square.

    Every frame differs from its neighbours (square position and colour both change with n), so tests can
    check that two sampled frames really are different frames of the source.
    """
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[..., 0] = (xs * 255 // max(w - 1, 1) + 7 * n) % 256
    img[..., 1] = (ys * 255 // max(h - 1, 1) + 3 * n) % 256
    img[..., 2] = (40 * n) % 256
    side = max(4, min(w, h) // 4)
    x0 = (n * 3) % max(w - side, 1)
    y0 = (n * 2) % max(h - side, 1)
    img[y0:y0 + side, x0:x0 + side] = (255, 255, 255) if n % 2 else (0, 0, 0)
    return img


def make_video(path, seconds: float = 2.0, fps: int = 30, size: tuple[int, int] = (64, 48),
               codec: str = "mpeg4", codec_options: dict | None = None, faststart: bool = False) -> str:
    """Write `round(seconds * fps)` frames at constant `fps` to `path` and return `path`.

    The time base is 1/fps and pts = frame number, so the container's average rate is exactly `fps` and
    `stream.frames` is the frame count (checked by reading the file back; a helper that writes a video
    with the wrong count would make every sampling test downstream meaningless). The container follows
    the extension (.mp4 by default in tests; .mkv gives a file whose header records no frame count).
    """
    path = str(path)
    count = int(round(seconds * fps))
    if count <= 0:
        raise ValueError(f"seconds * fps must give at least one frame, got {seconds} * {fps}")
    w, h = size
    with av.open(path, mode="w", options={"movflags": "+faststart"} if faststart else {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        time_base = Fraction(1, fps)
        stream.time_base = time_base
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", **(codec_options or {})}
        for n in range(count):
            frame = av.VideoFrame.from_ndarray(frame_pixels(n, size), format="rgb24")
            frame.pts = n
            # Not stream.time_base: the mp4 muxer rewrites that (to 1/15360) once the header is written,
            # and pts n in that base would collapse to 0 in the encoder's 1/fps base.
            frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with av.open(path) as check:
        s = check.streams.video[0]
        # mp4/mov/avi record the count in the header; Matroska does not (frames == 0): count packets there.
        frames = s.frames or sum(1 for p in check.demux(s) if p.size)
        if frames != count or s.average_rate != fps:
            raise AssertionError(f"{path}: wrote {count} frames at {fps} fps, container says "
                                 f"{frames} frames at {s.average_rate} fps")
    return path


def make_corrupt_video(path) -> str:
    """A .mp4-named file of garbage: 2 KiB of seeded random bytes (no valid container header)."""
    path = str(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return path


def make_text_file(path) -> str:
    """A .mp4-named text file holding 'hello'."""
    path = str(path)
    with open(path, "w") as f:
        f.write("hello")
    return path


def encoded_prompt(model, tokenizer, path, max_frames: int, question: str = "q"):
    """(prompt, embeds up to the end of the video) of a file sampled at 1 fps, timestamps padded to whole groups."""
    import torch

    from videoxl.language.prompt import build_prompt
    from videoxl.video.sources import load_video

    clip = load_video(path, max_frames, 1, None)
    with torch.inference_mode():
        visual = model.encode_clip(clip)
        ts = list(clip.timestamps) + [clip.timestamps[-1]] * (-len(clip) % 4)
        prompt = build_prompt(tokenizer, question, ts, model.config.tokens_per_group,
                              tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
        return prompt, model.embed_prompt(prompt, visual, prompt.video_end)
