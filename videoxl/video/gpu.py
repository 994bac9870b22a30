"""Frames on the GPU: NVDEC through PyAV's CUDA hardware decoding, frames kept in device memory (DLPack),
turned into the model's 384x384 input there.

The resize is PIL's bicubic resampling done exactly (the same fixed-point filter taps and rounding, as float64
matrix products, which are exact for these integers), so a frame's resized pixels equal PIL's for the same
RGB input. The RGB conversion (BT.601/709, limited or full range, chroma repeated over each 2x2 block as
FFmpeg's unscaled converter does) is computed in float32 and rounded; it differs from FFmpeg's fixed-point
converter by up to 3 levels (about 0.2 on average), which tests/test_video_decode.py measures on the CPU with
the same code, and bench/video_decode.py on NVDEC frames against the CPU decoder's.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from videoxl.errors import VideoXLError

PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c
# (Kr, Kb) of the colour matrices, by FFmpeg's AVColorSpace number; anything else is read as BT.601
MATRICES = {1: (0.2126, 0.0722), 5: (0.299, 0.114), 6: (0.299, 0.114), 9: (0.2627, 0.0593)}


def _bicubic(x: float) -> float:
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=16)
def pil_taps(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] integer weights of Pillow's 8-bit bicubic resample (precompute_coeffs +
    normalize_coeffs_8bpc), rows summing to about 2**PRECISION_BITS."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = [_bicubic((x + xmin - center + 0.5) / filterscale) for x in range(xmax - xmin)]
        total = sum(w)
        for x, v in enumerate(w):
            v = v / total if total != 0.0 else v
            fixed = v * (1 << PRECISION_BITS)
            taps[xx, xmin + x] = int(fixed - 0.5) if v < 0 else int(fixed + 0.5)  # C's truncating cast
    return taps


def _pass(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """One Pillow pass along the last axis: sum, add half, shift, clip to 0..255."""
    s = x @ taps.T + float(1 << (PRECISION_BITS - 1))
    return torch.floor(s / float(1 << PRECISION_BITS)).clamp_(0, 255)


def resize_exact(rgb: torch.Tensor, size: int = 384) -> torch.Tensor:
    """uint8-valued [h, w, 3] -> uint8 [size, size, 3], equal to PIL's `resize((size, size), BICUBIC)`:
    horizontal pass, 8-bit intermediate, vertical pass, as Pillow does them."""
    h, w, _ = rgb.shape
    x = rgb.permute(2, 0, 1).to(torch.float64)  # [3, h, w]
    if w != size:
        x = _pass(x, torch.from_numpy(pil_taps(w, size)).to(x.device))
    if h != size:
        x = _pass(x.transpose(1, 2), torch.from_numpy(pil_taps(h, size)).to(x.device)).transpose(1, 2)
    return x.permute(1, 2, 0).to(torch.uint8)


def yuv_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, colorspace: int = 2,
               full_range: bool = False) -> torch.Tensor:
    """8-bit planes (y [h, w]; u, v [h/2, w/2]) -> uint8 [h, w, 3]; each chroma sample covers its 2x2 block."""
    kr, kb = MATRICES.get(colorspace, MATRICES[5])
    kg = 1.0 - kr - kb
    h, w = y.shape
    u = u.repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w].float() - 128.0
    v = v.repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w].float() - 128.0
    if full_range:
        yf, cscale = y.float(), 1.0
    else:
        yf, cscale = (y.float() - 16.0) * (255.0 / 219.0), 255.0 / 224.0
    # FFmpeg's fixed-point converter lands about 1, 1.5 and 1 levels under the exact values (fitted on random
    # planes: mean error 0.7 -> 0.2 levels with these offsets, at most 2)
    r = yf + cscale * 2.0 * (1.0 - kr) * v - 1.0
    b = yf + cscale * 2.0 * (1.0 - kb) * u - 1.0
    g = yf - cscale * 2.0 * (kb * (1.0 - kb) * u + kr * (1.0 - kr) * v) / kg - 1.5
    return torch.stack([r, g, b], dim=-1).round_().clamp_(0, 255).to(torch.uint8)


def frame_to_model_input(y, u, v, colorspace: int, full_range: bool, turns: int) -> torch.Tensor:
    """Decoded planes -> the model's uint8 [384, 384, 3]; `turns` quarter turns counter-clockwise first."""
    rgb = yuv_to_rgb(y, u, v, colorspace, full_range)
    return resize_exact(torch.rot90(rgb, turns, dims=(0, 1)) if turns else rgb)


def on_current_gpu(device) -> torch.device:
    """`device` with its GPU index: a bare "cuda" means the caller's current GPU (decoder threads, which start
    with GPU 0 current, must be told which one)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def nvdec_accel(device: torch.device):
    """PyAV's CUDA decoding settings for `device`, or a reason why there is none."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, "not a CUDA device"
    try:
        from av.codec.hwaccel import HWAccel, hwdevices_available
    except ImportError:
        return None, "this PyAV has no hardware decoding"
    if "cuda" not in hwdevices_available():
        return None, "this PyAV's FFmpeg was built without CUDA"
    index = on_current_gpu(device).index
    # FFmpeg on torch's own CUDA context (the one current in the opening thread, see `open_nvdec`), not on the
    # primary context through its own door: there FFmpeg demands the CU_CTX_SCHED_BLOCKING_SYNC flag, and once
    # torch has made that context active with its own flags (any model loaded first) every open failed with
    # ENOTSUP, "[Errno 95] Operation not supported" (bench/nvdec_context.py shows it). A context of FFmpeg's
    # own would work but its frames could not be read by torch's kernels without a copy.
    options = {"primary_ctx": "0", "current_ctx": "1"}
    return HWAccel("cuda", device=str(index), allow_software_fallback=False, is_hw_owned=True,
                   options=options), None


def open_nvdec(path: str, accel, device: torch.device):
    """`av.open` with NVDEC on torch's context for `device`: made current in this thread first (it is per
    thread, and decoder threads start with none)."""
    import av

    torch.cuda.set_device(device)
    return av.open(path, hwaccel=accel)


def nv12_to_model_input(frame, turns: int) -> torch.Tensor:
    """An NV12 frame (in GPU memory from NVDEC, or in CPU memory: the same code) -> uint8 [384, 384, 3] where
    its planes are, through DLPack (no copy)."""
    from torch.utils.dlpack import from_dlpack

    h, w = frame.height, frame.width
    y = from_dlpack(frame.planes[0].__dlpack__())  # the capsule itself: PyAV refuses a stream argument
    uv = from_dlpack(frame.planes[1].__dlpack__())  # [h/2, w/2, 2]
    return frame_to_model_input(y[:h, :w], uv[..., 0], uv[..., 1], frame.colorspace, frame.color_range == 2,
                                turns)


def nvdec_convert(rotation_turns, device: torch.device):
    """A CUDA frame -> uint8 [384, 384, 3] on `device`.

    FFmpeg copies the decoded surface out on the legacy default stream, which is torch's default stream here,
    so kernels queued after it see the finished picture. The surface goes back to the decoder when `frame` is
    freed, so the conversion must be done by then: hence the wait at the end. (Converting on a high-priority
    stream per decoder thread instead was measured on the H200 and was slower: the hour's decoding 19.1 s ->
    27.3 s, vision's GPU time 8.6 s -> 13.5 s, twelve threads' float64 resizes then running at once ahead of
    the tower; so the model's own kernels leave the default stream instead, SideStream.)"""
    def convert(frame) -> torch.Tensor:
        if frame.format.name != "cuda":
            raise VideoXLError(f"NVDEC handed back a {frame.format.name} frame, not a CUDA one")
        out = nv12_to_model_input(frame, rotation_turns(frame.rotation))
        torch.cuda.current_stream(device).synchronize()
        return out
    return convert


class SideStream:
    """A CUDA stream of the model's own, off the default stream. NVDEC's pictures are mapped on the (legacy)
    default stream and each one is waited for there before its surface goes back to the decoder; any kernel
    queued on that stream (the tower's, a prefill's, or one made to wait for them) would make every such wait
    wait for it too, and decoding would stall while the GPU computes. Measured on the H200 (the camera-like
    hour, one prefill pass): with each vision slice joined back into the default stream, frame decoding took
    22.4 s; with a question's vision and prefill on a stream of their own, 19.1-19.5 s. So the vision tower
    runs on one (`run`), and a question's vision and prefill on another (`work`), which the default stream
    waits for only at the end."""

    def __init__(self, device: torch.device):
        use = device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device) if use else None

    @contextlib.contextmanager
    def work(self):
        """Make this the current stream for the block; the caller's stream waits for its work afterwards."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            caller.wait_stream(self.stream)

    def run(self, encode, frames) -> list:
        if self.stream is None:
            return list(encode(frames))
        device = self.stream.device
        self.stream.wait_stream(torch.cuda.current_stream(device))
        # the frames' conversion and stacking (decoder threads: the default stream), when the caller is elsewhere
        if torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
            self.stream.wait_stream(torch.cuda.default_stream(device))
        if torch.is_tensor(frames) and frames.is_cuda:
            frames.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            return list(encode(frames))

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
