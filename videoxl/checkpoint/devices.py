"""The `device` and `dtype` a user names, checked where they enter (`videoxl.load`, the CLI), and the device as a
thread's current CUDA device; a thread's copies on a stream of its own."""
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


@contextlib.contextmanager
def copy_stream(device):
    """A loading thread's copies on a CUDA stream of its own, finished when the block ends. `videoxl chat`
    decodes the first question's frames with NVDEC while the weights load, and FFmpeg copies each picture on
    the legacy default stream, which is ordered with every copy on that stream: on the H200 a 15.2 GB folder
    took 11.5 s to load from the page cache that way (2.2 s alone) and the 10,730 packets 14.7 s to decode
    (3.3 s after the load). Taking the weights' copies off that stream is the likely fix; not re-measured."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()  # the weights are whole before the model is used, on whatever stream
