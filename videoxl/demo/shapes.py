"""The synthetic "shapes" task (see the developers' `synthetic-task.md`): seeded videos of coloured shapes, one
star as the needle, and the answers to its four questions.

A video is a list of `Scene`s (whole seconds, one filled shape each, drifting a little); `render` draws any of its
frames with torch (vectorised over frames and pixels, CPU or GPU), `write_video` encodes a file with PyAV,
`model_frames` gives the 1-fps frames a 2-fps file yields at `sample_fps=1`, already at the model's 384x384
(so `chat` on them skips encoding and decoding; same timestamps 0.0, 1.0, ...).
"""
from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass

import numpy as np
import torch

FILE_FPS = 2
BACKGROUND = (32, 32, 32)
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
           "white": (240, 240, 240), "magenta": (220, 60, 220), "cyan": (40, 210, 220), "orange": (245, 140, 30)}
PLAIN_SHAPES = ("circle", "square", "triangle")
SHAPES = PLAIN_SHAPES + ("star",)
QUESTIONS = {"needle": "What colour is the star?",
             "first": "What colour is the shape at the start of the video?",
             "last": "What colour is the shape at the end of the video?",
             "after": "What shape comes right after the star?"}
KINDS = tuple(QUESTIONS)
ANSWER_WORDS = tuple(COLOURS) + SHAPES
MAX_DRIFT = 2.0  # px per file frame


@dataclass(frozen=True)
class Scene:
    start: int  # seconds, inclusive
    end: int  # seconds, exclusive
    shape: str
    colour: str
    x: float  # bounding-box centre at the scene's first frame, px of the source frame
    y: float
    size: float  # bounding-box height, px
    vx: float  # drift, px per file frame
    vy: float
    star_inner: float = 0.45  # star: inner / outer radius


@dataclass
class ShapesVideo:
    seconds: int
    width: int
    height: int
    scenes: list[Scene]
    noise: float  # sigma of the per-pixel Gaussian noise, 8-bit units
    seed: int = 0

    @property
    def answers(self) -> dict[str, str]:
        star = next(i for i, s in enumerate(self.scenes) if s.shape == "star")
        return {"needle": self.scenes[star].colour, "first": self.scenes[0].colour,
                "last": self.scenes[-1].colour, "after": self.scenes[star + 1].shape}


def scene_lengths(rng: np.random.Generator, seconds: int) -> list[int]:
    """4..12 s scenes, the last trimmed to fit but never under 4 s; at least 3 (the star is inside)."""
    if seconds < 12:
        raise ValueError("a shapes video needs at least 12 seconds (three scenes)")
    while True:
        lengths = []
        while sum(lengths) < seconds:
            lengths.append(int(rng.integers(4, 13)))
        lengths[-1] -= sum(lengths) - seconds
        if lengths[-1] >= 4 and len(lengths) >= 3:
            return lengths


def sample_video(rng: np.random.Generator, seconds: int, width: int = 320, height: int = 240,
                 noise: float = 4.0, seed: int = 0) -> ShapesVideo:
    lengths = scene_lengths(rng, seconds)
    star = int(rng.integers(1, len(lengths) - 1))
    scenes, start, colour = [], 0, None
    names = list(COLOURS)
    for i, n in enumerate(lengths):
        colour = names[int(rng.choice([j for j in range(len(names)) if names[j] != colour]))]
        shape = "star" if i == star else PLAIN_SHAPES[int(rng.integers(3))]
        size = float(rng.uniform(0.31, 0.49)) * height  # margin: pixel sampling clips the star's sharp tips
        half_w = size / 2 * (2 / math.sqrt(3) if shape == "triangle" else 1.0)  # star: width 0.951 R < height
        frames = n * FILE_FPS - 1
        vx, vy = (float(v) for v in rng.uniform(-MAX_DRIFT, MAX_DRIFT, 2))
        # keep the whole path inside the frame: shrink the drift if the box cannot travel that far
        room_x, room_y = width - 2 * half_w - 2, height - size - 2
        vx = float(np.clip(vx, -room_x / max(frames, 1), room_x / max(frames, 1)))
        vy = float(np.clip(vy, -room_y / max(frames, 1), room_y / max(frames, 1)))
        lo_x, hi_x = half_w + 1 + max(0.0, -vx * frames), width - half_w - 1 - max(0.0, vx * frames)
        lo_y, hi_y = size / 2 + 1 + max(0.0, -vy * frames), height - size / 2 - 1 - max(0.0, vy * frames)
        x, y = float(rng.uniform(lo_x, max(lo_x, hi_x))), float(rng.uniform(lo_y, max(lo_y, hi_y)))
        scenes.append(Scene(start, start + n, shape, colour, x, y, size, vx, vy, float(rng.uniform(0.38, 0.5))))
        start += n
    return ShapesVideo(seconds, width, height, scenes, noise, seed)


def make_video(seed: int, seconds: int, width: int = 320, height: int = 240, noise: float = 4.0) -> ShapesVideo:
    """The held-out / demo video `seed` (its own seed domain, so never one of the training videos)."""
    return sample_video(np.random.default_rng([1, seed, seconds]), seconds, width, height, noise, seed)


def _star_inside(dx, dy, outer, inner_ratio):
    """Points (dx, dy from the star's centre, y down) inside an upright five-pointed star of outer radius R."""
    rho = torch.sqrt(dx * dx + dy * dy)
    phi = torch.remainder(torch.atan2(dx, -dy), 2 * math.pi / 5)
    phi = torch.minimum(phi, 2 * math.pi / 5 - phi)  # fold onto the half-sector [0, 36 deg]
    px, py = rho * torch.sin(phi), rho * torch.cos(phi)
    a = math.pi / 5
    qx, qy = outer * inner_ratio * math.sin(a), outer * inner_ratio * math.cos(a)  # inner vertex
    # origin side of the edge from the outer vertex (0, R) to the inner vertex (qx, qy)
    ex, ey = qx, qy - outer
    return ex * (py - outer) - ey * px <= 0


def shape_masks(video: ShapesVideo, frame_idx: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor):
    """bool [n, H, W] masks and colour [n, 3] of the shapes in file frames `frame_idx` (at FILE_FPS)."""
    dev = frame_idx.device
    starts = torch.tensor([s.start * FILE_FPS for s in video.scenes], device=dev)
    sid = torch.searchsorted(starts, frame_idx, right=True) - 1
    par = torch.tensor([[s.x, s.y, s.size, s.vx, s.vy, s.star_inner, SHAPES.index(s.shape)] for s in video.scenes],
                       dtype=torch.float32, device=dev)[sid]
    t = (frame_idx - starts[sid]).float()
    cx, cy, size = par[:, 0] + par[:, 3] * t, par[:, 1] + par[:, 4] * t, par[:, 2]
    dx = xs[None, None, :] + 0.5 - cx[:, None, None]
    dy = ys[None, :, None] + 0.5 - cy[:, None, None]
    s = size[:, None, None]
    kind = par[:, 6].long()
    mask = torch.zeros(dx.shape[0], dy.shape[1], dx.shape[2], dtype=torch.bool, device=dev)
    for k in kind.unique().tolist():  # each shape's test only on its own frames
        sel = (kind == k).nonzero()[:, 0]
        x, y, sk = dx[sel], dy[sel], s[sel]
        if k == 0:
            mask[sel] = x * x + y * y <= (sk / 2) ** 2
        elif k == 1:
            mask[sel] = (x.abs() <= sk / 2) & (y.abs() <= sk / 2)
        elif k == 2:
            depth = y + sk / 2  # below the triangle's apex
            mask[sel] = (depth >= 0) & (depth <= sk) & (x.abs() <= depth / math.sqrt(3))
        else:
            outer = sk / (1 + math.cos(math.pi / 5))  # top point to the lower points' line = box height
            mask[sel] = _star_inside(x, y - (outer - sk / 2), outer, par[sel, 5][:, None, None])
    colours = torch.tensor([COLOURS[s.colour] for s in video.scenes], dtype=torch.float32, device=dev)[sid]
    return mask, colours


def render(video: ShapesVideo, frame_idx, device="cpu", chunk: int = 64) -> torch.Tensor:
    """uint8 [n, H, W, 3] file frames `frame_idx` (numbers at FILE_FPS) with the video's seeded noise."""
    frame_idx = torch.as_tensor(frame_idx, dtype=torch.long, device=device)
    xs = torch.arange(video.width, device=device, dtype=torch.float32)
    ys = torch.arange(video.height, device=device, dtype=torch.float32)
    bg = torch.tensor(BACKGROUND, dtype=torch.uint8, device=device)
    out = []
    for c in range(0, len(frame_idx), chunk):
        idx = frame_idx[c:c + chunk]
        mask, colours = shape_masks(video, idx, xs, ys)
        img = torch.where(mask[..., None], colours.to(torch.uint8)[:, None, None, :], bg)
        if video.noise > 0:
            gen = torch.Generator(device=device).manual_seed(video.seed * 1_000_003 + int(idx[0]))
            noise = torch.randn(img.shape, generator=gen, device=device).mul_(video.noise).round_()
            img = noise.add_(img).clamp_(0, 255).to(torch.uint8)
        out.append(img)
    return torch.cat(out)


def frames_1fps(video: ShapesVideo, device="cpu") -> torch.Tensor:
    """The frames `sample_fps=1` takes from the 2-fps file (file frames 0, 2, 4, ...): uint8 [seconds, H, W, 3]."""
    return render(video, torch.arange(0, video.seconds * FILE_FPS, FILE_FPS), device)


def model_frames(video: ShapesVideo, device="cpu") -> list[np.ndarray]:
    """1-fps frames resized to 384x384 exactly as the file path resizes them, for `chat(frames, ...)`."""
    from videoxl.video.sources import resize_frame

    return [resize_frame(f) for f in frames_1fps(video, device).cpu().numpy()]


def write_video(video: ShapesVideo, path: str, codec: str = "mpeg4", bit_rate: int | None = None,
                fps: int = FILE_FPS) -> str:
    """Encode the video at 2 fps (or `fps`, 1: the frames `sample_fps=1` takes) (yuv420p) with PyAV: 'mpeg4' or
    'libx264' (h264)."""
    import av

    if fps not in (1, FILE_FPS):
        raise ValueError(f"fps must be 1 or {FILE_FPS}, got {fps}")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    every = FILE_FPS // fps
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.width, video.height, "yuv420p"
        if bit_rate:
            stream.bit_rate = bit_rate
        for s in range(0, video.seconds * FILE_FPS, 64 * every):
            frames = render(video, torch.arange(s, min(s + 64 * every, video.seconds * FILE_FPS), every)).numpy()
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def first_word(answer: str) -> str:
    words = answer.strip().split()
    return words[0].lower().strip(string.punctuation) if words else ""


def is_correct(answer: str, expected: str) -> bool:
    """The task's rule: the answer's first word, lower-cased and stripped of punctuation, is the expected word."""
    return first_word(answer) == expected
