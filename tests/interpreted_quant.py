"""Run by tests/test_quant.py in a subprocess with TRITON_INTERPRET=1: the int8 matrix-vector kernel, and the
decode step's body over fused int8 layers, interpreted on the CPU against the eager int8 path
(torch._weight_int8pack_mm). Prints one JSON line of errors."""
import json
import sys

import interpreted_kernels  # noqa: F401  (the interpreter patch for numpy >= 2.4)
import torch

import videoxl
from videoxl.language import quant
from videoxl.language.int8_gemv import int8_gemv


def gemv_error(n, k, m, bias, tiles=None):
    q = quant.QuantLinear.quantize(torch.randn(n, k), torch.randn(n) if bias else None, "int8")
    x = torch.randn(m, k)
    ref = x @ q.dequantize().t() + (q.bias if bias else 0)
    return (int8_gemv(x, q.qweight, q.scale, q.bias, tiles) - ref).abs().max().item() / ref.abs().max().item()


def fp8_rows_errors():
    """The one-pass fp8 row quantization against QuantLinear's unfused arithmetic: the scales, exactly, and the
    signs of the values. Not their magnitudes: the interpreter's own fp32 -> e4m3 conversion does not round to
    nearest (126.3 became 64, where the GPU and torch give 128), so tests/test_gpu_quant.py checks the bytes on
    the GPU."""
    from videoxl.language.fp8_rows import quantize_rows

    x = (torch.randn(5, 2500) * torch.rand(5, 1) * 3).bfloat16()
    q, s = quantize_rows(x)
    ref_s = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / quant.FP8_MAX
    ref = (x.float() / ref_s).clamp(-quant.FP8_MAX, quant.FP8_MAX).to(torch.float8_e4m3fn).float()
    signs = (torch.sign(q.float()) * torch.sign(ref) < 0).sum().item()
    return {"fp8_scale": (s - ref_s).abs().max().item(), "fp8_sign_flips": signs}


def main(tiny_dir):
    torch.manual_seed(0)
    errors = {"gemv": max(gemv_error(*c, False) for c in [(40, 1000, 1), (16, 512, 3), (3, 7, 2)]),
              "gemv_bias": gemv_error(24, 600, 2, True),
              # K split in stretches (a ragged last one), partial sums added by a second kernel
              "gemv_split": max(gemv_error(40, 1000, 2, False, (8, 64, 4, 3)), gemv_error(24, 600, 2, True, (4, 128, 4, 4))),
              **fp8_rows_errors()}
    model, _ = videoxl.load(tiny_dir, device="cpu", dtype="float32", quantize="int8")
    dec = model.decoder

    def without_kernel(run):  # the reference: the eager layers, without the kernel
        quant._INTERPRET = False
        try:
            return run()
        finally:
            quant._INTERPRET = True

    with torch.inference_mode():
        _, _, worst, kv = interpreted_kernels.step_against_eager(dec, without_kernel)
    errors["step_logits"], errors["step_kv"] = worst, kv
    print(json.dumps(errors))


if __name__ == "__main__":
    main(sys.argv[1])
