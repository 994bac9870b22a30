"""The `device` and `dtype` a user names, checked where they enter (`videoxl.load`, the CLI), and the device as a
thread's current CUDA device."""
from __future__ import annotations

import contextlib

import torch

from videoxl.errors import VideoXLError


def on_device(device):
    """The device as the thread's current CUDA device, else nothing: kernels launched without a device (Triton's,
    the quantizing ones at load) go to the current GPU, which must be the model's."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def parse_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise VideoXLError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VideoXLError("device 'cuda' asked for, but this torch sees no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VideoXLError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type != "cpu":
        raise VideoXLError(f"device must be a CPU or a CUDA GPU, got {device}")
    return device


def parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype) and dtype in names.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in names:
        raise VideoXLError(f"dtype must be one of {sorted(names)} (or torch.float32 / bfloat16 / float16), "
                           f"got {dtype!r}")
    return names[dtype]
