"""The synthetic "shapes" task (see the developers' `synthetic-task.md`): seeded videos of coloured shapes, one
star as the needle, and the answers to its questions: version 1's four, and version 2's rings, the
seven-segment digit on the star and three more kinds (digit, count, time).

A video is a list of `Scene`s (whole seconds, one filled shape each, drifting a little); `render` draws any of its
frames with torch (vectorised over frames and pixels, CPU or GPU), `write_video` encodes a file with PyAV,
`model_frames` gives the 1-fps frames a 2-fps file yields at `sample_fps=1`, already at the model's 384x384
(so `chat` on them skips encoding and decoding; same timestamps 0.0, 1.0, ...).
"""
from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, replace

import numpy as np
import torch

FILE_FPS = 2
BACKGROUND = (32, 32, 32)
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
           "white": (240, 240, 240), "magenta": (220, 60, 220), "cyan": (40, 210, 220), "orange": (245, 140, 30)}
PLAIN_SHAPES = ("circle", "square", "triangle")
SHAPES = PLAIN_SHAPES + ("star", "ring")  # the index is the drawing code of `shape_masks`
QUESTIONS = {"needle": "What colour is the star?",  # version 1: fixed texts
             "first": "What colour is the shape at the start of the video?",
             "last": "What colour is the shape at the end of the video?",
             "after": "What shape comes right after the star?"}
V2_QUESTIONS = {"digit": "What number is on the star?", "count": "How many rings are there?"}
TIME_QUESTION = "What colour is the shape at {n} seconds?"
V1_KINDS = tuple(QUESTIONS)
KINDS = V1_KINDS + tuple(V2_QUESTIONS) + ("time",)
DIGITS = tuple(str(d) for d in range(10))
ANSWER_WORDS = tuple(COLOURS) + SHAPES + DIGITS
MAX_DRIFT = 2.0  # px per file frame
RING_STROKE = 0.15  # of the outer diameter
DIGIT_HEIGHT, DIGIT_BAR = 0.36, 0.18  # of the star's box height; of the digit's height (its width is half that)
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc",
            8: "abcdefg", 9: "abcdfg"}


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
    digit: int = -1  # version 2's star: the digit drawn on it


@dataclass
class ShapesVideo:
    seconds: int
    width: int
    height: int
    scenes: list[Scene]
    noise: float  # sigma of the per-pixel Gaussian noise, 8-bit units
    seed: int = 0
    version: int = 2
    time_n: int = -1  # version 2: N of the time question (-1: no second fits the rule; no time question)

    @property
    def kinds(self) -> tuple[str, ...]:
        return V1_KINDS if self.version == 1 else KINDS if self.time_n >= 0 else KINDS[:-1]

    @property
    def questions(self) -> dict[str, str]:
        """kind -> the question's exact text, for the kinds this video has."""
        out = dict(QUESTIONS)
        if self.version >= 2:
            out.update(V2_QUESTIONS)
            if self.time_n >= 0:
                out["time"] = TIME_QUESTION.format(n=self.time_n)
        return out

    def scene_at(self, second: float) -> Scene:
        return next(s for s in self.scenes if s.start <= second < s.end)

    @property
    def star(self) -> int:
        return next(i for i, s in enumerate(self.scenes) if s.shape == "star")

    @property
    def answers(self) -> dict[str, str]:
        star = self.star
        out = {"needle": self.scenes[star].colour, "first": self.scenes[0].colour,
               "last": self.scenes[-1].colour, "after": self.scenes[star + 1].shape}
        if self.version >= 2:
            out["digit"] = str(self.scenes[star].digit)
            out["count"] = str(sum(s.shape == "ring" for s in self.scenes))
            if self.time_n >= 0:
                out["time"] = self.scene_at(self.time_n).colour
        return out

    def evidence(self, kind: str) -> list[tuple[int, int]]:
        """[(first, last) second, ...] of the scenes that hold `kind`'s answer (what an oracle keeps dense)."""
        star = self.star
        rings = [i for i, s in enumerate(self.scenes) if s.shape == "ring"]
        scenes = {"needle": [star], "digit": [star], "after": [star, star + 1], "first": [0],
                  "last": [len(self.scenes) - 1], "count": rings}.get(kind)
        if scenes is None:  # time: the four seconds asked about
            return [(self.time_n, self.time_n + 3)]
        return [(self.scenes[i].start, self.scenes[i].end - 1) for i in scenes]


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


def time_seconds(scenes: list[Scene]) -> list[int]:
    """The Ns of the time question: multiples of 4 with the seconds N..N+3 all inside one scene."""
    return [n for s in scenes for n in range(-(-s.start // 4) * 4, s.end - 3, 4)]


def add_version2(rng: np.random.Generator, scenes: list[Scene]) -> tuple[list[Scene], int]:
    """Rings (0..min(3, scenes-3) of them, never first, last or the star), the star's digit, and N. Drawn after
    everything version 1 draws, so a version 2 video is its version 1 twin with rings and a digit."""
    star = [s.shape for s in scenes].index("star")
    rings = int(rng.integers(0, min(3, len(scenes) - 3) + 1))
    spots = [i for i in range(1, len(scenes) - 1) if i != star]
    ring_at = set(int(i) for i in rng.choice(spots, rings, replace=False)) if rings else set()
    digit = int(rng.integers(10))
    scenes = [replace(s, shape="ring") if i in ring_at else replace(s, digit=digit) if i == star else s
              for i, s in enumerate(scenes)]
    ns = time_seconds(scenes)
    return scenes, int(ns[int(rng.integers(len(ns)))]) if ns else -1


def sample_video(rng: np.random.Generator, seconds: int, width: int = 320, height: int = 240,
                 noise: float = 4.0, seed: int = 0, version: int = 2) -> ShapesVideo:
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
    scenes, time_n = add_version2(rng, scenes) if version >= 2 else (scenes, -1)
    return ShapesVideo(seconds, width, height, scenes, noise, seed, version, time_n)


def make_video(seed: int, seconds: int, width: int = 320, height: int = 240, noise: float = 4.0,
               version: int = 2) -> ShapesVideo:
    """The held-out / demo video `seed` (its own seed domain, so never one of the training videos)."""
    return sample_video(np.random.default_rng([1, seed, seconds]), seconds, width, height, noise, seed, version)


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


def digit_ink(dx, dy, size, lit):
    """Points (dx, dy from the star's box centre) on a seven-segment digit: height DIGIT_HEIGHT * the box's
    `size`, width half that, bars DIGIT_BAR of its height thick; `lit` bool [n, 7] segments a..g per frame."""
    h = DIGIT_HEIGHT * size
    w, bar = h / 2, DIGIT_BAR * h
    left, right = (dx >= -w / 2) & (dx <= -w / 2 + bar), (dx >= w / 2 - bar) & (dx <= w / 2)
    across, upper, lower = dx.abs() <= w / 2, (dy >= -h / 2) & (dy <= 0), (dy >= 0) & (dy <= h / 2)
    bars = {"a": across & (dy >= -h / 2) & (dy <= -h / 2 + bar), "b": right & upper, "c": right & lower,
            "d": across & (dy >= h / 2 - bar) & (dy <= h / 2), "e": left & lower, "f": left & upper,
            "g": across & (dy.abs() <= bar / 2)}
    ink = torch.zeros(dx.shape[0], dy.shape[1], dx.shape[2], dtype=torch.bool, device=dx.device)
    for i, name in enumerate("abcdefg"):
        ink |= bars[name] & lit[:, i, None, None]
    return ink


def shape_masks(video: ShapesVideo, frame_idx: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor):
    """bool [n, H, W] masks, colour [n, 3] of the shapes in file frames `frame_idx` (at FILE_FPS), and bool
    [n, H, W] of the star's digit (black, drawn over the shape)."""
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
        elif k == 3:
            outer = sk / (1 + math.cos(math.pi / 5))  # top point to the lower points' line = box height
            mask[sel] = _star_inside(x, y - (outer - sk / 2), outer, par[sel, 5][:, None, None])
        else:  # ring: a circle outline, its stroke RING_STROKE of the outer diameter
            r2 = x * x + y * y
            mask[sel] = (r2 <= (sk / 2) ** 2) & (r2 > (sk / 2 - RING_STROKE * sk) ** 2)
    colours = torch.tensor([COLOURS[s.colour] for s in video.scenes], dtype=torch.float32, device=dev)[sid]
    lit = torch.tensor([[c in SEGMENTS.get(s.digit, "") for c in "abcdefg"] for s in video.scenes],
                       device=dev)[sid]
    ink = digit_ink(dx, dy, s, lit) if bool(lit.any()) else torch.zeros_like(mask)
    return mask, colours, ink


def render(video: ShapesVideo, frame_idx, device="cpu", chunk: int = 64) -> torch.Tensor:
    """uint8 [n, H, W, 3] file frames `frame_idx` (numbers at FILE_FPS) with the video's seeded noise."""
    frame_idx = torch.as_tensor(frame_idx, dtype=torch.long, device=device)
    xs = torch.arange(video.width, device=device, dtype=torch.float32)
    ys = torch.arange(video.height, device=device, dtype=torch.float32)
    bg = torch.tensor(BACKGROUND, dtype=torch.uint8, device=device)
    out = []
    for c in range(0, len(frame_idx), chunk):
        idx = frame_idx[c:c + chunk]
        mask, colours, ink = shape_masks(video, idx, xs, ys)
        img = torch.where(mask[..., None], colours.to(torch.uint8)[:, None, None, :], bg)
        img = torch.where(ink[..., None], torch.zeros((), dtype=torch.uint8, device=device), img)
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
    return (answer.split() or [""])[0].lower().strip(string.punctuation)


def is_correct(answer: str, expected: str) -> bool:
    """The task's rule: the answer's first word, lower-cased and stripped of punctuation, is the expected word."""
    return first_word(answer) == expected
