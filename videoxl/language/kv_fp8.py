"""The FP8 KV cache (`videoxl.load(..., kv_dtype="fp8")`): keys and values stored as float8 e4m3 with one fp32
scale per token and layer (shared by the token's KV heads), halving the cache's bytes.

Why this scheme:
* e4m3 is a floating-point format: each value keeps 3 mantissa bits over about 17 binades, so a scale only has to
  put the token's largest element near 448 (the largest finite e4m3). Channels far smaller than that one (a
  key's rotary channels vary by orders of magnitude) keep their relative precision, which an integer format
  would lose without per-channel scales (KIVI's reason for them).
* A scale per token is computed from that token alone, when it is written: appending frames to a live session,
  a follow-up's tokens and a disk entry never need a calibration pass or a rescale of what is stored, and
  any split of a video into pieces stores what one piece stores (up to the fp32 rounding its K/V already differ
  by: a scale's last bits, tests/test_kv_fp8.py).
* One scale for the token's 4 KV heads, in fp32: 4 bytes per 512 of fp8 in each of K and V (0.8 %). A scale per
  head would cost four times that, and 10,000 frames (387,882 tokens) would no longer fit in 10.5 GiB.

Readers see values in the model's dtype: `dequantize` (eager paths, bi-level's gathers), and the decode kernel,
which multiplies each key's dot products and each value's weights by the token's scale (decoding/kernels.py).
"""
from __future__ import annotations

import torch

from videoxl.language.quant import parse_fp8_setting, require_fp8

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def parse_kv_dtype(value) -> str | None:
    """None / "none" / "model" / "auto": the KVs in the model's dtype; "fp8": the FP8 cache; else one line."""
    return parse_fp8_setting(value, "kv_dtype")


def check_kv_device(device: torch.device) -> None:
    """The decode kernel converts e4m3 on the GPU, which Triton does from compute capability 8.9 (Ada, Hopper)."""
    require_fp8(device, "kv_dtype", "leave kv_dtype unset (or use --offload to keep the KVs in CPU memory)")


@torch.no_grad()  # a cache is never trained through (and out= below refuses autograd)
def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, heads, n, d] -> (e4m3 [1, heads, n, d], fp32 scale [n]): each token's largest |x| maps to 448."""
    xf = x.float()
    amax = xf.abs().amax(dim=(0, 1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / scale[None, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


@torch.no_grad()
def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None):
    """e4m3 [..., n, d] with scale [n] -> values in `dtype`, into `out` if given (of q's shape). The product is
    taken in fp32 and rounded once, element by element: no fp32 copy of the layer is made (e4m3 -> `dtype` is
    exact)."""
    out = q.to(dtype) if out is None else out.copy_(q)
    return torch.mul(out, scale[:, None], out=out)


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """K and V of one token in every layer: e4m3 values plus the two fp32 scales."""
    return 2 * num_layers * (num_kv_heads * head_dim + 4)
