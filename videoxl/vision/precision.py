"""FP8 vision (`videoxl.load(..., vision_dtype="fp8")`): SigLIP's and the projector's linear layers as e4m3
GEMMs, quantized at load time from the checkpoint's weights.

What changes: every `nn.Linear` of the vision side (per SigLIP layer q/k/v/out_proj, fc1, fc2; the projector's
two) becomes a `language.quant.QuantLinear` of scheme "fp8": e4m3 weights with a scale per output channel, each
input row (token) quantized at run time with its own scale, one row-wise `torch._scaled_mm` (the decoder's fp8
scheme, so one tested implementation serves both). What stays: the patch embedding (a 14x14 convolution with 3
input channels: too thin a GEMM to gain), attention itself (SDPA in the model's dtype), the layer norms, DTS
(its attention and convolution) and the 2x2 pooling. Why these: the linear layers hold about 95 % of SigLIP's
FLOPs at 729 tokens per frame, and FP8 tensor cores run them at twice bf16's rate on Hopper.

The quantized layers hold `qweight`/`scale` buffers, so the model's weight digest (part of every video KV cache
key) changes with them: KVs from fp8 vision never match a bf16 entry.
"""
from __future__ import annotations

from torch import nn

from videoxl.errors import VideoXLError
from videoxl.language.quant import parse_fp8_setting


def parse_vision_dtype(value) -> str | None:
    """None / "none" / "model" / "auto" / "": the vision side in the model's dtype; "fp8": FP8 GEMMs; else one
    line."""
    return parse_fp8_setting(value, "vision_dtype", off=("none", "model", "auto", ""))


def quantize_vision(vision: nn.Module, scheme: str) -> int:
    """Replace the vision side's linear layers by `scheme` QuantLinears, in place; returns how many."""
    from videoxl.language.quant import QuantLinear

    names = [n for n, m in vision.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        linear = vision.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.detach()
        vision.set_submodule(name, QuantLinear.quantize(linear.weight.detach(), bias, scheme))
    if not names:
        raise VideoXLError("vision_dtype='fp8': the vision side has no linear layers to quantize")
    return len(names)
