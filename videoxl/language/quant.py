"""Quantized decoder weights: `videoxl.load(..., quantize="int8" | "int4" | "fp8")`.

Only the decoder layers' seven linear layers (q/k/v/o, gate/up/down) are quantized, at load time, from the bf16
checkpoint; the embedding, the output head, the norms and the vision side stay in the model's dtype.

* `int8`: weight-only, one scale per output channel (symmetric, round to nearest). One token's decode step is
  a matrix-vector product per layer, bound by the bytes read: on CUDA a Triton kernel (`int8_gemv.py`) reads the
  int8 weight and scales the fp32 sum, for up to `GEMV_ROWS` rows; longer inputs (prefill) convert the weight to
  the model's dtype and use cuBLAS, where the product, not the conversion, dominates.
* `int4`: weight-only, asymmetric, groups of 128 along the input, the layout of PyTorch's own tinygemm kernel
  (`torch._weight_int4pack_mm`, the one torchao's int4 weight-only path calls): w = (q - 8) * scale + zero. On
  CUDA it wants bf16 activations and an input width padded to a multiple of 1024 (as torchao pads it).
* `fp8`: e4m3 weights with a scale per output channel, activations quantized per token at run time, one
  `torch._scaled_mm` (row-wise scales). CUDA cards need compute capability >= 8.9; on the CPU torch runs the
  same arithmetic (slowly), which is what the tests and the demo model's accuracy use.

Why not torchao: its int8 weight-only linear converts the whole weight to bf16 on every call (fast only under
torch.compile, which the hand-captured decode graph does not use), and its int4 path is the tinygemm op called
here. A `QuantLinear` keeps its quantized tensors as buffers whose names (`qweight`, `scale`) no checkpoint has,
so its `state_dict` cannot be loaded as one, and `checkpoint/tiny.py` refuses to write it.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from videoxl.errors import VideoXLError

SCHEMES = ("int8", "int4", "fp8")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INT4_GROUP = 128
INT4_INNER_K_TILES = 8  # tinygemm's packing; torchao uses 8 too
INT4_K_MULTIPLE = 1024  # tinygemm's input width, padded (torchao pads to the same)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
GEMV_ROWS = 4  # inputs up to this many rows use the int8 matrix-vector kernel on CUDA
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the Triton kernel on the CPU


def parse_quantize(quantize) -> str | None:
    """None / "none" / "bf16" -> None (no quantization); a known scheme -> itself; else one clear line."""
    if quantize is None or (isinstance(quantize, str) and quantize.lower() in ("none", "bf16", "")):
        return None
    if not isinstance(quantize, str) or quantize.lower() not in SCHEMES:
        raise VideoXLError(f"quantize must be one of {', '.join(SCHEMES)} (or none), got {quantize!r}")
    return quantize.lower()


def parse_fp8_setting(value, what: str, off: tuple[str, ...] = ("none", "model", "auto")) -> str | None:
    """A setting that is either the model's dtype (None or a word in `off`) or "fp8" (vision_dtype, kv_dtype);
    anything else is one line naming `what`."""
    if value is None or (isinstance(value, str) and value.lower() in off):
        return None
    if not isinstance(value, str) or value.lower() != "fp8":
        raise VideoXLError(f"{what} must be 'fp8' or none (the model's dtype), got {value!r}")
    return "fp8"


def require_fp8(device: torch.device, what: str, instead: str) -> None:
    """Refuse in one line `what`='fp8' on a GPU below compute capability 8.9 (no FP8), saying what to do
    `instead`; a CPU runs fp8 in software."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise VideoXLError(f"{what}='fp8' needs a GPU with FP8 (compute capability >= 8.9: Ada, Hopper or "
                           f"newer); {torch.cuda.get_device_name(device)} is {major}.{minor}: {instead}")


def check_device(scheme: str, device: torch.device, dtype: torch.dtype, what: str = "quantize") -> None:
    """Refuse, in one line, a scheme this device and dtype cannot run (before any weight is read). `what`: the
    setting that asked for it, as the user wrote it (quantize, vision_dtype)."""
    if device.type != "cuda":
        return  # the CPU runs all three (fp8 through torch's reference _scaled_mm)
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    instead = "use quantize='int8' or 'int4'" if what == "quantize" else f"leave {what} unset (the model's dtype)"
    if scheme == "fp8":
        require_fp8(device, what, instead)
    if scheme == "int4" and major < 8:
        raise VideoXLError(f"quantize='int4' needs compute capability >= 8.0 (tinygemm); {name} is "
                           f"{major}.{minor}: use quantize='int8'")
    if scheme in ("int4", "fp8") and dtype != torch.bfloat16:  # tinygemm's and row-wise _scaled_mm's only dtype
        raise VideoXLError(f"{what}='{scheme}' on a GPU runs in bfloat16, got dtype {dtype}: "
                           f"use dtype='bfloat16'")
    if scheme == "fp8":  # row-wise scaled matmul is newer than fp8 itself: one probe, one clear line
        try:
            a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                             scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError) as e:
            raise VideoXLError(f"{what}='fp8': this torch cannot run row-wise fp8 matmuls on {name} "
                               f"({str(e).splitlines()[0][:120]}): {instead}") from None


def stored_bytes(name: str, out_features: int, in_features: int, scheme: str) -> int:
    """Bytes the quantized weight `name` [out, in] takes on a GPU (int4: CUDA's padded width, bf16 scales and
    zeros, held twice for the layers the decode step fuses: see `fuse`)."""
    if scheme in ("int8", "fp8"):
        return out_features * (in_features + 4)  # one byte a weight, an fp32 scale a channel
    k = -(-in_features // INT4_K_MULTIPLE) * INT4_K_MULTIPLE
    copies = 1 if name.split(".")[-2] in ("o_proj", "down_proj") else 2
    return out_features * k // 2 + copies * (k // INT4_GROUP) * out_features * 2 * 2


def is_target(name: str) -> bool:
    """Whether a parameter name (ours) is the weight of a quantized linear layer."""
    parts = name.split(".")
    return (len(parts) == 6 and parts[0] == "decoder" and parts[1] == "layers" and parts[-1] == "weight"
            and parts[-2] in TARGETS)


def _int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return {"qweight": torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}


def _fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return {"qweight": (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), "scale": scale}


def int4_codes(w: torch.Tensor, k_padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes 0..15 int32 [N, k_padded], scale_and_zero [k_padded / 128, N, 2] fp32), tinygemm's convention."""
    n, k = w.shape
    w = F.pad(w.float(), (0, k_padded - k)).view(n, k_padded // INT4_GROUP, INT4_GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k_padded)
    zero = lo + 8 * scale  # w = (q - 8) * scale + zero
    return codes, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def int4_padded_width(k: int, cuda: bool) -> int:
    return -(-k // (INT4_K_MULTIPLE if cuda else INT4_GROUP)) * (INT4_K_MULTIPLE if cuda else INT4_GROUP)


def int4_pack(codes: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """tinygemm's buffers from `int4_codes`' output, in the layout of the device the codes are on."""
    if codes.is_cuda:
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # even column in the high nibble
        packed = torch._convert_weight_to_int4pack(pairs.contiguous(), INT4_INNER_K_TILES)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    return {"qweight": packed, "scale": sz.to(dtype)}


def _int4(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return int4_pack(*int4_codes(w, int4_padded_width(w.shape[1], w.is_cuda)), dtype)


class QuantLinear(nn.Module):
    """A quantized `nn.Linear` (same call, same bias). `in_features` is the unpadded input width."""

    def __init__(self, scheme: str, in_features: int, out_features: int, buffers: dict[str, torch.Tensor],
                 bias: torch.Tensor | None):
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, in_features, out_features
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str) -> "QuantLinear":
        """From a float weight [out, in] (on the device it will run on) and its bias."""
        with torch.no_grad():
            if scheme == "int8":
                buffers = _int8(weight)
            elif scheme == "fp8":
                buffers = _fp8(weight)
            else:
                buffers = _int4(weight, weight.dtype)
        return cls(scheme, weight.shape[1], weight.shape[0], buffers, bias)

    @property
    def cat_dims(self) -> dict[str, int]:
        """Along which dimension of each buffer the output channels lie (how layers fuse side by side)."""
        return {"qweight": 0, "scale": 1 if self.scheme == "int4" else 0}

    def extra_repr(self) -> str:
        return f"{self.scheme}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] these buffers stand for (tests and benchmarks check the kernels with it)."""
        if self.scheme == "int4":
            eye = torch.eye(self._k_padded(), dtype=self.scale.dtype, device=self.qweight.device)
            return self._int4_mm(eye).t()[:, :self.in_features].to(dtype).contiguous()
        return self.qweight.to(dtype) * self.scale[:, None].to(dtype)

    def _k_padded(self) -> int:
        return self.scale.shape[0] * INT4_GROUP

    def _int4_mm(self, x2: torch.Tensor) -> torch.Tensor:
        k = self._k_padded()
        if x2.shape[1] < k:
            x2 = F.pad(x2, (0, k - x2.shape[1]))
        if x2.is_cuda:
            return torch._weight_int4pack_mm(x2, self.qweight, INT4_GROUP, self.scale)
        return torch._weight_int4pack_mm_for_cpu(x2, self.qweight, INT4_GROUP, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.scheme == "int8":
            if (x2.is_cuda or _INTERPRET) and x2.shape[0] <= GEMV_ROWS:
                from videoxl.language.int8_gemv import int8_gemv

                return int8_gemv(x2, self.qweight, self.scale, self.bias).view(*shape[:-1], -1)
            if x2.is_cuda:  # long inputs: the product dominates the conversion; the fp32 scale kept fp32
                y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale
            else:
                y = torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(x2.dtype))
        elif self.scheme == "int4":
            y = self._int4_mm(x2.contiguous())
        else:
            if x2.is_cuda:  # one pass (fp8_rows.py) instead of six over the activations
                from videoxl.language.fp8_rows import quantize_rows

                xq, x_scale = quantize_rows(x2)
            else:
                x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
                xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scale[None, :],
                                 out_dtype=x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class SideBySide(nn.Module):
    """The parts' outputs side by side, one call each: int4 on the CPU, whose packing interleaves blocks of 64
    output channels (parts of other sizes cannot be joined); only the tests run it."""

    def __init__(self, parts: list[QuantLinear]):
        super().__init__()
        self.parts = parts  # a plain list: not registered, so not a second copy in state_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse(parts: list[QuantLinear]) -> nn.Module:
    """One QuantLinear computing `parts` side by side (q/k/v, gate/up: one product for the decode step). The
    parts' buffers become views into the fused ones where the output channels are the leading dimension, so
    the weights are not stored twice (tinygemm's CUDA packing keeps each 8 output channels apart, so int4 joins
    too); int4's scales lie along dimension 1 ([groups, N, 2]) and the parts keep contiguous copies of theirs
    (tinygemm reads them as contiguous): 1/64 of the int4 bytes."""
    first = parts[0]
    if first.scheme == "int4" and not first.qweight.is_cuda:
        return SideBySide(parts)
    buffers = {name: torch.cat([getattr(p, name) for p in parts], dim) for name, dim in first.cat_dims.items()}
    bias = None if first.bias is None else torch.cat([p.bias.data for p in parts])
    fused = QuantLinear(first.scheme, first.in_features, sum(p.out_features for p in parts), buffers, bias)
    starts = dict.fromkeys(first.cat_dims, 0)
    offset = 0
    for p in parts:
        for name, dim in first.cat_dims.items():
            n = getattr(p, name).shape[dim]  # int4 on CUDA packs 8 output channels into each qweight row
            view = buffers[name].narrow(dim, starts[name], n)
            setattr(p, name, view if dim == 0 else view.contiguous())
            starts[name] += n
        if bias is not None:
            p.bias.data = bias[offset:offset + p.out_features]
        offset += p.out_features
    return fused


def quantized_scheme(module: nn.Module) -> str | None:
    """The scheme of a model's quantized layers, or None when it has none."""
    return next((m.scheme for m in module.modules() if isinstance(m, QuantLinear)), None)


def install(model: nn.Module, layers: dict[str, QuantLinear], state: dict[str, torch.Tensor]) -> None:
    """Put the quantized layers (module name -> QuantLinear, made as the checkpoint was read) into `model` in
    place of its linears, with their biases from `state`, and add their tensors to `state` for the strict load."""
    for name, layer in layers.items():
        bias = state.pop(name + ".bias", None)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        model.set_submodule(name, layer)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})


_FUSED: "weakref.WeakKeyDictionary[QuantLinear, nn.Module]" = weakref.WeakKeyDictionary()


def fuse_once(parts: list[QuantLinear]) -> nn.Module:
    """`fuse(parts)`, remembered by its first part: fusing again would copy the weights a second time."""
    fused = _FUSED.get(parts[0])
    if fused is None:
        fused = _FUSED[parts[0]] = fuse(parts)
    return fused
