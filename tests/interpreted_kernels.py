"""Run by tests/test_decoding.py in a subprocess with TRITON_INTERPRET=1: the decode kernels and the whole
captured-step body, interpreted on the CPU, against plain PyTorch (float32). Prints one JSON line of errors."""
import json
import sys

import triton.runtime.interpreter as interpreter

_patch = interpreter._patch_lang_tensor


def _patched(tensor, scope):
    # triton 3.6's interpreter holds program ids as shape-(1,) arrays, which numpy >= 2.4 will not turn into an
    # index (a loop bound); the compiled kernels are unaffected
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patched

import torch  # noqa: E402

import videoxl  # noqa: E402
from videoxl.language.decoder import apply_rope, rope_cos_sin  # noqa: E402
from videoxl.decoding import kernels  # noqa: E402
from videoxl.decoding.captured import CapturedStep  # noqa: E402


def attention_error(n_kv, g, d, length, capacity, splits):
    q = torch.randn(n_kv * g, d)
    k, v = torch.randn(n_kv, capacity, d), torch.randn(n_kv, capacity, d)
    out = kernels.decode_attention(q, k, v, torch.tensor([length], dtype=torch.int32), splits=splits)
    kk, vv = k[:, :length].repeat_interleave(g, 0), v[:, :length].repeat_interleave(g, 0)
    ref = (torch.softmax(torch.einsum("hd,hnd->hn", q, kk) * d ** -0.5, -1)[:, :, None] * vv).sum(1)
    return (out - ref).abs().max().item()


def step_against_eager(dec, reference=lambda run: run()):
    """The captured step's body (what the CUDA graph records) against the decoder's eager forward over 6 tokens
    after a 29-token prompt: (step, its store, largest logit difference, largest K/V difference). `reference` wraps each
    eager call (e.g. to switch a kernel off for it)."""
    prompt = torch.randint(0, dec.cfg.vocab_size, (1, 29))
    eager_cache, fast_cache = dec.new_cache(capacity=64), dec.new_cache(capacity=64)
    for cache in (eager_cache, fast_cache):
        dec(dec.embed_tokens(prompt), cache)
    step = CapturedStep(dec, fast_cache)
    step.pos.fill_(fast_cache.length)
    worst = 0.0
    for token in torch.randint(0, dec.cfg.vocab_size, (6,)).tolist():
        ref = reference(lambda: dec(dec.embed_tokens(torch.tensor([[token]])), eager_cache)[0])
        step.token.fill_(token)
        got = step._body()
        step.pos.add_(1)
        worst = max(worst, (got - ref).abs().max().item())
    step.finish(6)
    kv = max((a - b).abs().max().item() for i in range(dec.cfg.num_hidden_layers)
             for a, b in zip(eager_cache.layer(i), fast_cache.layer(i)))
    return step, fast_cache, worst, kv  # the store too: the step holds it only weakly


def main(tiny_dir):
    torch.manual_seed(0)
    errors = {}
    # lengths shorter than the splits, not a multiple of the tile, and one split's worth
    errors["attention"] = max(attention_error(*case) for case in [
        (2, 2, 16, 3, 64, 8), (2, 2, 16, 37, 64, 4), (4, 7, 128, 300, 512, 4), (1, 1, 32, 64, 64, 1)])
    x, r, w = torch.randn(1, 96), torch.randn(1, 96), torch.randn(96)
    out, summed = kernels.rms_norm(x, w, 1e-6, residual=r)
    s = x + r
    errors["rms_norm"] = max((out - w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))).abs().max().item(),
                             (summed - s).abs().max().item())
    n_heads, n_kv, d = 4, 2, 16
    qkv, pos = torch.randn(n_heads + 2 * n_kv, d), torch.tensor([5])
    cos, sin = rope_cos_sin(pos, d, 1e6, torch.float32)
    q_out, k_cache, v_cache = torch.empty(n_heads, d), torch.zeros(n_kv, 9, d), torch.zeros(n_kv, 9, d)
    kernels.rope_store(qkv, cos[0], sin[0], pos, q_out, k_cache, v_cache, n_heads, n_kv, d)
    errors["rope_store"] = max((q_out - apply_rope(qkv[:n_heads], cos, sin)).abs().max().item(),
                               (k_cache[:, 5] - apply_rope(qkv[n_heads:n_heads + n_kv], cos, sin)).abs().max().item(),
                               (v_cache[:, 5] - qkv[n_heads + n_kv:]).abs().max().item(),
                               k_cache[:, 4].abs().max().item() + k_cache[:, 6].abs().max().item())

    # the captured step's body (what the CUDA graph records) against the decoder's eager forward, 6 tokens
    model, _ = videoxl.load(tiny_dir, device="cpu", dtype="float32")
    dec = model.decoder
    with torch.inference_mode():
        step, store, worst, kv = step_against_eager(dec)
        # a second step on the same decoder finds the projections already side by side and reuses them
        again = CapturedStep(dec, store)
        same = all(a.data_ptr() == b.data_ptr() and a.shape == b.shape
                   for w1, w2 in zip(step.weights, again.weights) for a, b in zip(w1, w2))
    errors["step_logits"], errors["step_kv"], errors["fused_reused"] = worst, kv, same
    print(json.dumps(errors))


if __name__ == "__main__":
    main(sys.argv[1])
