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


def gemv_error(n, k, m, bias):
    q = quant.QuantLinear.quantize(torch.randn(n, k), torch.randn(n) if bias else None, "int8")
    x = torch.randn(m, k)
    ref = x @ q.dequantize().t() + (q.bias if bias else 0)
    return (int8_gemv(x, q.qweight, q.scale, q.bias) - ref).abs().max().item() / ref.abs().max().item()


def main(tiny_dir):
    torch.manual_seed(0)
    errors = {"gemv": max(gemv_error(*c, False) for c in [(40, 1000, 1), (16, 512, 3), (3, 7, 2)]),
              "gemv_bias": gemv_error(24, 600, 2, True)}
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
