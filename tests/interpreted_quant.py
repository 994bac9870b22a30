"""Run by tests/test_quant.py in a subprocess with TRITON_INTERPRET=1: the int8 matrix-vector kernel, and the
decode step's body over fused int8 layers, interpreted on the CPU against the eager int8 path
(torch._weight_int8pack_mm). Prints one JSON line of errors."""
import json
import sys

import interpreted_kernels  # noqa: F401  (the interpreter patch for numpy >= 2.4)
import torch

import videoxl
from videoxl.decoding.captured import CapturedStep
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
    with torch.inference_mode():
        prompt = torch.randint(0, dec.cfg.vocab_size, (1, 29))
        eager_cache, fast_cache = dec.new_cache(capacity=64), dec.new_cache(capacity=64)
        for cache in (eager_cache, fast_cache):
            dec(dec.embed_tokens(prompt), cache)
        step = CapturedStep(dec, fast_cache)
        step.pos.fill_(fast_cache.length)
        worst = 0.0
        for token in torch.randint(0, dec.cfg.vocab_size, (6,)).tolist():
            quant._INTERPRET = False  # the reference: the eager layers, without the kernel
            ref = dec(dec.embed_tokens(torch.tensor([[token]])), eager_cache)[0]
            quant._INTERPRET = True
            step.token.fill_(token)
            got = step._body()
            step.pos.add_(1)
            worst = max(worst, (got - ref).abs().max().item())
        step.finish(6)
        kv = max((a - b).abs().max().item() for i in range(dec.cfg.num_hidden_layers)
                 for a, b in zip(eager_cache.layer(i), fast_cache.layer(i)))
    errors["step_logits"], errors["step_kv"] = worst, kv
    print(json.dumps(errors))


if __name__ == "__main__":
    main(sys.argv[1])
