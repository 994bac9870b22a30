"""Run by tests/test_decoding.py in a subprocess with TRITON_INTERPRET=1: the decode kernels and the whole
captured-step body, interpreted on the CPU, against plain PyTorch (float32). Prints one JSON line of errors."""
import json
import sys

import numpy as np
import triton.runtime.interpreter as interpreter

_patch = interpreter._patch_lang_tensor


def _patched(tensor, scope):
    # triton 3.6's interpreter holds program ids as shape-(1,) arrays, which numpy >= 2.4 will not turn into an
    # index (a loop bound); the compiled kernels are unaffected
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patched
_convert = interpreter._convert_float


def _to_fp8(input, input_dtype, output_dtype, rounding_mode):
    # the interpreter's float32 -> e4m3 rounding drops the carry when a mantissa rounds up into the next binade
    # (126.2 -> 64, not 128); the GPU's conversion (cvt.rn.satfinite) is IEEE round-to-nearest-even, as torch's is
    if input_dtype == interpreter.tl.float32 and output_dtype == interpreter.tl.float8e4nv:
        import torch
        return torch.from_numpy(np.ascontiguousarray(input)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return _convert(input, input_dtype, output_dtype, rounding_mode)


interpreter._convert_float = _to_fp8
_cast = interpreter.InterpreterBuilder.cast_impl


def _cast_bf16_to_f16(self, src, dst_type):
    # the interpreter holds bf16 as raw 16-bit words and casts them to fp16 with numpy's astype (the words' integer
    # values); the compiled conversion goes through the value: so does this, by way of float32
    tl = interpreter.tl
    if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float16:
        f32 = _convert(src.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(f32.astype(np.float16), dst_type.scalar)
    return _cast(self, src, dst_type)


interpreter.InterpreterBuilder.cast_impl = _cast_bf16_to_f16

import torch  # noqa: E402

import videoxl  # noqa: E402
from videoxl.language.decoder import apply_rope, rope_cos_sin  # noqa: E402
from videoxl.decoding import kernels  # noqa: E402
from videoxl.language import kv_fp8  # noqa: E402
from videoxl.decoding.captured import CapturedStep  # noqa: E402


def attention_error(n_kv, g, d, length, capacity, splits):
    q = torch.randn(n_kv * g, d)
    k, v = torch.randn(n_kv, capacity, d), torch.randn(n_kv, capacity, d)
    out = kernels.decode_attention(q, k, v, torch.tensor([length], dtype=torch.int32), splits=splits)
    kk, vv = k[:, :length].repeat_interleave(g, 0), v[:, :length].repeat_interleave(g, 0)
    ref = (torch.softmax(torch.einsum("hd,hnd->hn", q, kk) * d ** -0.5, -1)[:, :, None] * vv).sum(1)
    return (out - ref).abs().max().item()


def fp8_attention_error(n_kv, g, d, length, capacity, splits, f16=False):
    """The kernel reading an FP8 cache (scales per token) against plain attention over the dequantized cache;
    `f16`: a bf16 query, the dot products in fp16 (the interpreter cannot multiply bf16 matrices)."""
    q = torch.randn(n_kv * g, d).to(torch.bfloat16 if f16 else torch.float32)
    k8, ks = kv_fp8.quantize(torch.randn(1, n_kv, capacity, d) * torch.rand(1, 1, capacity, 1) * 8)
    v8, vs = kv_fp8.quantize(torch.randn(1, n_kv, capacity, d))
    out = kernels.decode_attention(q, k8[0], v8[0], torch.tensor([length], dtype=torch.int32), splits=splits,
                                   scales=(ks, vs), f16=f16).float()
    q = q.float()
    k, v = (kv_fp8.dequantize(x[0], s, torch.float32) for x, s in ((k8, ks), (v8, vs)))
    kk, vv = k[:, :length].repeat_interleave(g, 0), v[:, :length].repeat_interleave(g, 0)
    ref = (torch.softmax(torch.einsum("hd,hnd->hn", q, kk) * d ** -0.5, -1)[:, :, None] * vv).sum(1)
    return (out - ref).abs().max().item()


def fp8_store_mismatch(n_heads, n_kv, d):
    """rope_store_fp8's quantized K, V and scales at position 3 against kv_fp8.quantize of rope_store's."""
    qkv, pos = torch.randn(n_heads + 2 * n_kv, d) * 3, torch.tensor([3])
    cos, sin = rope_cos_sin(pos, d, 1e6, torch.float32)
    q_out, k_ref, v_ref = torch.empty(n_heads, d), torch.zeros(n_kv, 5, d), torch.zeros(n_kv, 5, d)
    kernels.rope_store(qkv, cos[0], sin[0], pos, q_out, k_ref, v_ref, n_heads, n_kv, d)
    buffers = (torch.zeros(n_kv, 5, d, dtype=kv_fp8.FP8), torch.zeros(n_kv, 5, d, dtype=kv_fp8.FP8),
               torch.zeros(5), torch.zeros(5))
    kernels.rope_store_fp8(qkv, cos[0], sin[0], pos, torch.empty(n_heads, d), torch.empty(2, n_kv, 1, d),
                           torch.zeros(1, dtype=torch.long), buffers, n_heads, n_kv, d)
    worst = 0.0
    for i, ref in enumerate((k_ref, v_ref)):
        q8, scale = kv_fp8.quantize(ref[None, :, 3:4])
        worst = max(worst, (buffers[2 + i][3] - scale[0]).abs().item() / scale[0].item(),
                    (buffers[i][:, 3].float() - q8[0, :, 0].float()).abs().max().item())
    return worst


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

    # the FP8 cache: its kernels, and the captured step's body over an fp8 store against the eager fp8 path
    errors["fp8_attention"] = max(fp8_attention_error(*case) for case in [
        (2, 2, 16, 37, 64, 4), (4, 7, 128, 300, 512, 4), (1, 1, 32, 5, 64, 8)])
    errors["fp8_f16_attention"] = max(fp8_attention_error(*case, f16=True) for case in [
        (2, 2, 16, 37, 64, 4), (4, 7, 128, 300, 512, 4)])
    errors["fp8_store"] = fp8_store_mismatch(4, 2, 16)
    dec.kv_dtype = "fp8"
    with torch.inference_mode():
        step8, store8, errors["fp8_step_logits"], errors["fp8_step_kv"] = step_against_eager(dec)
        errors["fp8_step_valid"] = step8.valid_for(store8)  # a follow-up question replays it (4 buffers a layer)
    print(json.dumps(errors))


if __name__ == "__main__":
    main(sys.argv[1])
