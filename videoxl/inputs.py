"""What a `chat` call is given, checked where it enters: every mistake becomes one `VideoXLError` line.

`check_request` turns the model card's arguments into a `Request` the pipeline can trust: the video as a path
or a list of images / uint8 HxWx3 frames (a [T, H, W, 3] array or tensor is split into frames, float images in
[0, 1] are scaled to 0..255), numpy numbers as Python numbers, the history as (question, answer) pairs, and a
question + history short enough for the decoder (checked before any frame is decoded). (An out-of-memory
anywhere in a call becomes one line in memory.py; what a question reports, in the pipeline.)
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from videoxl.errors import VideoXLError
from videoxl.cache.identity import VideoRef

# Question + chat history, in tokens. Far above any real question, far below the decoder's context (32,768 for
# Qwen2.5-7B), and small enough that the question's prefill (its attention over the video) stays in memory.
MAX_TEXT_TOKENS = 8192
VIDEO_KINDS = "a video file, an image, a folder of images, or a list of images / HxWx3 frames"


@dataclass
class Request:
    video: object  # str path, or a list of paths / PIL images / uint8 HxWx3 arrays
    question: str
    history: list[tuple[str, str]]
    max_num_frames: int
    sample_fps: float | None
    max_sample_fps: float | None


def check_request(config, tokenizer, video_path, question, chat_history, max_num_frames, sample_fps,
                  max_sample_fps) -> Request:
    history = check_question(config, tokenizer, question, chat_history)
    return Request(check_video(video_path), question, history, as_int(max_num_frames),
                   as_float(sample_fps), as_float(max_sample_fps))


def check_question(config, tokenizer, question, chat_history) -> list[tuple[str, str]]:
    """A question and its chat history (returned as (question, answer) pairs), short enough for the decoder."""
    if not isinstance(question, str) or not question.strip():
        raise VideoXLError("question must be a non-empty string")
    history = check_history(chat_history)
    check_text_length(config, tokenizer, question, history)
    return history


# ---- numbers ----------------------------------------------------------------------------------------------------
def as_int(x):
    """numpy integers (a frame count from numpy arithmetic) as Python ints; anything else is checked later."""
    return int(x) if isinstance(x, np.integer) else x


def as_float(x):
    return float(x) if isinstance(x, (np.integer, np.floating)) else x


# ---- history and text length --------------------------------------------------------------------------------------
def check_history(chat_history) -> list[tuple[str, str]]:
    """[{"role": "user"|"assistant", "content": str}, ...] in user/assistant order (what `chat` returns with
    `return_history=True`), or [(question, answer), ...]; None or [] for none."""
    if chat_history is None:
        return []
    if not isinstance(chat_history, (list, tuple)):
        raise VideoXLError(f"chat_history must be a list of messages or (question, answer) pairs, got "
                           f"{type(chat_history).__name__}")
    if not chat_history:
        return []
    if all(isinstance(m, Mapping) for m in chat_history):
        texts = []
        for i, m in enumerate(chat_history):
            want = "user" if i % 2 == 0 else "assistant"
            if m.get("role") != want or not isinstance(m.get("content"), str):
                raise VideoXLError(f"chat_history[{i}] must be {{'role': '{want}', 'content': <str>}} (turns "
                                   f"alternate user, assistant), got {_short(m)}")
            texts.append(m["content"])
        if len(texts) % 2:
            raise VideoXLError("chat_history ends with a user message that has no assistant answer")
        return list(zip(texts[::2], texts[1::2]))
    pairs = []
    for i, pair in enumerate(chat_history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise VideoXLError(f"chat_history[{i}] must be a (question, answer) pair of strings or a "
                               f"{{'role', 'content'}} message, got {_short(pair)}")
        pairs.append((pair[0], pair[1]))
    return pairs


def history_messages(pairs: list[tuple[str, str]]) -> list[dict]:
    return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def check_text_length(config, tokenizer, question: str, history: list[tuple[str, str]]) -> None:
    limit = min(MAX_TEXT_TOKENS, getattr(config.text, "max_position_embeddings", MAX_TEXT_TOKENS))
    texts = [question] + [t for pair in history for t in pair]
    if sum(len(t.encode()) for t in texts) <= limit:  # byte-level BPE: a token is at least one UTF-8 byte
        return
    n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    if n > limit:
        what = "question + chat history" if history else "question"
        raise VideoXLError(f"{what} is {n} tokens ({sum(map(len, texts))} characters); at most {limit} "
                           f"are allowed: shorten it")


# ---- video ------------------------------------------------------------------------------------------------------
def check_video(video):
    """A path stays a path (`bytes` decoded); arrays and tensors become a list of uint8 HxWx3 frames."""
    if video is None:
        raise VideoXLError(f"video_path is None: give {VIDEO_KINDS}")
    if isinstance(video, VideoRef):  # a video named by its content id (the server's), its file checked as any
        return video if video.path is None else VideoRef(video.id, check_video(video.path))
    if isinstance(video, bytes):
        if len(video) > 4096 or b"\0" in video:
            raise VideoXLError(f"video_path is {len(video)} bytes of data, not a path: write them to a file and "
                               "pass its path")
        video = os.fsdecode(video)
    if isinstance(video, (str, os.PathLike)):
        if not os.fspath(video):
            raise VideoXLError("video_path is an empty string")
        return video
    if isinstance(video, (np.ndarray, torch.Tensor)):
        arr = _numpy(video)
        if arr.ndim == 4:
            return [to_uint8_frame(f, f"frame {i}") for i, f in enumerate(arr)]
        if arr.ndim == 3:
            return [to_uint8_frame(arr, "image")]
        raise VideoXLError(f"a video array must be [T, H, W, 3] frames or one [H, W, 3] image, got shape "
                           f"{list(arr.shape)}")
    if isinstance(video, (list, tuple)):
        from PIL import Image

        if not video:
            raise VideoXLError("video_path is an empty list: give at least one image or frame")
        items = []
        for i, item in enumerate(video):
            if isinstance(item, (np.ndarray, torch.Tensor)):
                items.append(to_uint8_frame(_numpy(item), f"video_path[{i}]"))
            elif isinstance(item, bytes):
                items.append(check_video(item))
            elif isinstance(item, (str, os.PathLike, Image.Image)):
                items.append(item)
            else:
                raise VideoXLError(f"video_path[{i}] is a {type(item).__name__}: list items must be image paths, "
                                   "PIL images or HxWx3 arrays")
        return items
    raise VideoXLError(f"video_path must be {VIDEO_KINDS}; got a {type(video).__name__}")


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return x


def to_uint8_frame(arr: np.ndarray, name: str) -> np.ndarray:
    """One HxWx3 RGB frame as uint8. Floats must be in [0, 1] (scaled to 0..255, as image libraries do);
    integers in 0..255. Anything else is refused: a silent cast would show a black or wrapped-around frame."""
    if arr.ndim != 3 or arr.shape[2] != 3:
        hint = " (channels last: HxWx3, not 3xHxW)" if arr.ndim == 3 and arr.shape[0] == 3 else ""
        raise VideoXLError(f"{name} must be an HxWx3 RGB array{hint}, got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        raise VideoXLError(f"{name} is empty (shape {list(arr.shape)})")
    if arr.dtype.kind == "f":
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
            raise VideoXLError(f"{name}: float pixel values must be in [0, 1], got [{lo:g}, {hi:g}] (pass uint8 "
                               "for 0..255)")
        return np.rint(arr * 255.0).astype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = int(np.min(arr)), int(np.max(arr))
        if lo < 0 or hi > 255:
            raise VideoXLError(f"{name}: integer pixel values must be in 0..255, got [{lo}, {hi}]")
        return arr.astype(np.uint8)
    raise VideoXLError(f"{name}: pixel type {arr.dtype} is not supported (use uint8, or float in [0, 1])")


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
