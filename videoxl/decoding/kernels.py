"""Triton kernels for one decode step: the few places where a token's step is not a matrix-vector product.

* `rms_norm`: optional residual add + RMSNorm in one pass (eager: ~8 kernels);
* `rope_store`: rotate q and k at the step's position and write k, v into the cache at that position, the
  position read from a device tensor (eager: ~12 kernels and a host-side index);
* `decode_attention`: one query token's attention over a long cache, split along the keys so that every SM has
  work (flash-decoding), grouped-query heads read their shared K/V once, the valid length read from a device
  tensor so a captured graph serves every step.

Each kernel rounds where the eager path rounds (in the model's dtype), so the captured step follows the eager
step bit for bit except for the attention's summation order. Triton is imported lazily: CPU-only installs
never need it (the eager step serves them).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


# ---- RMSNorm (with the residual add that precedes it) ------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(X, R, W, OUT, SUM, eps, N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0.0)
    if HAS_RES:  # x + residual, rounded to the model dtype as the eager add is
        x = (x.to(tl.float32) + tl.load(R + offs, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(SUM + offs, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=m, other=0.0)
    tl.store(OUT + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(OUT.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """norm(x [+ residual]) for one token's hidden vector; with a residual also returns x + residual."""
    n = x.numel()
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out
    _rms_norm_kernel[(1,)](x, residual if residual is not None else x, weight, out, summed, eps, N=n,
                           BLOCK=triton.next_power_of_2(n), HAS_RES=residual is not None, num_warps=8)
    return (out, summed) if residual is not None else out


# ---- RoPE + cache write ------------------------------------------------------------------------------------------
@triton.jit
def _rope_store_kernel(QKV, COS, SIN, POS, Q_OUT, K_CACHE, V_CACHE, stride_kh, stride_kn, stride_vh, stride_vn,
                       N_HEADS: tl.constexpr, N_KV: tl.constexpr, D: tl.constexpr):
    head = tl.program_id(0)  # 0..N_HEADS-1: queries; then N_KV keys; then N_KV values
    half = D // 2
    offs = tl.arange(0, D)
    partner = tl.where(offs < half, offs + half, offs - half)
    sign = tl.where(offs < half, -1.0, 1.0)
    x = tl.load(QKV + head * D + offs)
    pos = tl.load(POS)
    dt = x.dtype
    if head < N_HEADS + N_KV:
        # x*cos + rotate_half(x)*sin, each product rounded to the model dtype as the eager expression is
        xp = tl.load(QKV + head * D + partner).to(tl.float32) * sign
        a = (x.to(tl.float32) * tl.load(COS + offs).to(tl.float32)).to(dt)
        b = (xp.to(dt).to(tl.float32) * tl.load(SIN + offs).to(tl.float32)).to(dt)
        y = (a.to(tl.float32) + b.to(tl.float32)).to(dt)
        if head < N_HEADS:
            tl.store(Q_OUT + head * D + offs, y)
        else:
            tl.store(K_CACHE + (head - N_HEADS) * stride_kh + pos * stride_kn + offs, y)
    else:
        tl.store(V_CACHE + (head - N_HEADS - N_KV) * stride_vh + pos * stride_vn + offs, x)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, q_out: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> None:
    """qkv [n_heads + 2 n_kv, head_dim] (one token) -> q_out rotated; k rotated and v written into
    k_cache/v_cache [n_kv, capacity, head_dim] at position `pos` (a one-element device tensor)."""
    _rope_store_kernel[(n_heads + 2 * n_kv,)](qkv, cos, sin, pos, q_out, k_cache, v_cache, k_cache.stride(0),
                                             k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                                             N_HEADS=n_heads, N_KV=n_kv, D=head_dim, num_warps=1)


# ---- the FP8 cache's write: one token's K and V, quantized with a scale per token (language/kv_fp8.py) -------------
@triton.jit
def _fp8_store_kernel(SRC_K, SRC_V, POS, K_CACHE, V_CACHE, K_SCALE, V_SCALE, stride_kh, stride_kn, stride_vh,
                      stride_vn, N_KV: tl.constexpr, KV_PAD: tl.constexpr, D: tl.constexpr):
    which = tl.program_id(0)  # 0: keys, 1: values
    offs_h = tl.arange(0, KV_PAD)
    offs_d = tl.arange(0, D)
    m = offs_h[:, None] < N_KV
    pos = tl.load(POS)
    if which == 0:
        x = tl.load(SRC_K + offs_h[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        x = tl.load(SRC_V + offs_h[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0).to(tl.float8e4nv)
    if which == 0:
        tl.store(K_CACHE + offs_h[:, None] * stride_kh + pos * stride_kn + offs_d[None, :], q, mask=m)
        tl.store(K_SCALE + pos, scale)
    else:
        tl.store(V_CACHE + offs_h[:, None] * stride_vh + pos * stride_vn + offs_d[None, :], q, mask=m)
        tl.store(V_SCALE + pos, scale)


def rope_store_fp8(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, q_out: torch.Tensor,
                   kv_tmp: torch.Tensor, zero: torch.Tensor, buffers: tuple, n_heads: int, n_kv: int,
                   head_dim: int) -> None:
    """`rope_store` into an FP8 cache: q rotated into q_out; k rotated and v into `kv_tmp` [2, n_kv, 1, head_dim]
    (the model's dtype, as the eager path rounds them; `zero` a device tensor holding 0), then both quantized
    into `buffers` = (K, V, K scales, V scales) at position `pos`."""
    rope_store(qkv, cos, sin, zero, q_out, kv_tmp[0], kv_tmp[1], n_heads, n_kv, head_dim)
    k, v, ks, vs = buffers
    _fp8_store_kernel[(2,)](kv_tmp[0], kv_tmp[1], pos, k, v, ks, vs, k.stride(0), k.stride(1), v.stride(0),
                            v.stride(1), N_KV=n_kv, KV_PAD=triton.next_power_of_2(n_kv), D=head_dim, num_warps=1)


# ---- split-KV attention for one query token ----------------------------------------------------------------------
@triton.jit
def _attn_split_kernel(Q, K, V, K_SCALE, V_SCALE, LEN, O_PART, M_PART, L_PART, stride_kh, stride_kn, stride_vh,
                       stride_vn, scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       SPLITS: tl.constexpr, IEEE: tl.constexpr, FP8: tl.constexpr, F16: tl.constexpr):
    kv = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(LEN)
    # the valid keys are shared evenly among the splits in whole tiles, whatever the buffer's capacity
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (kv * G + offs_g)[:, None] * D + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    if F16:  # e4m3 -> fp16 is one conversion instruction; -> bf16 goes through fp16 first
        q = q.to(tl.float16)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    k_base = K + kv * stride_kh
    v_base = V + kv * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        if FP8:  # e4m3 -> the query's dtype is exact; each key's scale multiplies its dot products
            k = k.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if FP8:
            s = s * tl.load(K_SCALE + offs_n, mask=valid, other=0.0)[None, :]
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        pw = p
        # each value's scale multiplies its weight (the sum l_i keeps the unscaled weights); with F16 a weight
        # p * scale under 6e-5 (fp16's smallest normal) keeps fewer bits: the H200's logit error at 79k tokens was
        # the same with fp16 and bf16 dot products (0.112 / 0.113, bench/RESULTS.md)
        if FP8:
            v = v.to(q.dtype)
            pw = p * tl.load(V_SCALE + offs_n, mask=valid, other=0.0)[None, :]
        if IEEE:
            pv = tl.dot(pw.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(pw.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    row = (kv * SPLITS + split) * G_PAD + offs_g
    tl.store(O_PART + row[:, None] * D + offs_d[None, :], acc)
    tl.store(M_PART + row, m_i)
    tl.store(L_PART + row, l_i)


@triton.jit
def _attn_combine_kernel(O_PART, M_PART, L_PART, OUT, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                         SPLITS: tl.constexpr):
    head = tl.program_id(0)
    kv = head // G
    g = head % G
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    rows = (kv * SPLITS + offs_s) * G_PAD + g
    m = tl.load(M_PART + rows)
    l_part = tl.load(L_PART + rows)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty splits weigh nothing
    acc = tl.load(O_PART + rows[:, None] * D + offs_d[None, :])
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_part * w, axis=0)
    tl.store(OUT + head * D + offs_d, out.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _splits(device_index: int, n_kv: int) -> int:
    """Enough (kv head, split) programs to fill the GPU about twice over; a power of two for the combine."""
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    return min(256, triton.next_power_of_2(max(1, 2 * sms // n_kv)))


# The split kernel's launch settings for a bf16 (False) and an fp8 (True) cache: tile of keys, warps, pipeline
# stages, splits (None: enough programs to fill the GPU twice) and, for fp8 with a bf16 query, dot products in
# fp16 (e4m3 -> fp16 is one conversion). Chosen on the H200 by bench/attn_sweep.py over 79k and 388k cached
# tokens, timed in CUDA graphs (bench/RESULTS.md, sixth session): bf16 64 splits instead of 128 (its kernel
# 3.7 -> 4.2 TB/s at 388k); fp8 tiles of 128 keys, 64 splits and fp16 dot products (2.1 -> 3.3 TB/s).
ATTENTION_CONFIG = {False: {"block_n": 64, "num_warps": 4, "num_stages": 3, "splits": 64, "f16": False},
                    True: {"block_n": 128, "num_warps": 4, "num_stages": 3, "splits": 64, "f16": True}}


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     splits: int | None = None, block_n: int | None = None, scales: tuple | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, f16: bool | None = None):
    """q [n_heads, head_dim] (one token, RoPE applied) over k_cache/v_cache [n_kv, capacity, head_dim], of which
    the first `length` (a one-element int device tensor) positions are valid -> [n_heads, head_dim]. An FP8
    cache passes its (K scales, V scales) [capacity]. Settings left None come from ATTENTION_CONFIG."""
    config = ATTENTION_CONFIG[scales is not None]
    if splits is None:  # (Triton's CPU interpreter, in tests: 4 splits)
        splits = (config["splits"] or _splits(q.device.index or 0, k_cache.shape[0])) if q.device.type == "cuda" else 4
    block_n = config["block_n"] if block_n is None else block_n
    num_warps = config["num_warps"] if num_warps is None else num_warps
    num_stages = config["num_stages"] if num_stages is None else num_stages
    f16 = config["f16"] if f16 is None else f16
    n_heads, d = q.shape
    n_kv = k_cache.shape[0]
    g = n_heads // n_kv
    g_pad = max(16, triton.next_power_of_2(g))  # tl.dot needs 16 rows
    o_part = torch.empty((n_kv * splits * g_pad, d), dtype=torch.float32, device=q.device)
    m_part = torch.empty((n_kv * splits * g_pad,), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    k_scale, v_scale = scales if scales is not None else (length, length)  # (unread without FP8)
    _attn_split_kernel[(n_kv, splits)](q, k_cache, v_cache, k_scale, v_scale, length, o_part, m_part, l_part,
                                      k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                                      d ** -0.5, G=g, G_PAD=g_pad, D=d, BLOCK_N=block_n, SPLITS=splits,
                                      IEEE=q.dtype == torch.float32, FP8=scales is not None,
                                      F16=f16 and scales is not None and q.dtype == torch.bfloat16,
                                      num_warps=num_warps, num_stages=num_stages)
    out = torch.empty_like(q)
    _attn_combine_kernel[(n_heads,)](o_part, m_part, l_part, out, G=g, G_PAD=g_pad, D=d, SPLITS=splits,
                                     num_warps=4)
    return out
