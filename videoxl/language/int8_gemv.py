"""y = x W^T * scale (+ bias) for a few rows of x and an int8 weight W [N, K] with one scale per output channel.

A decode step's products are matrix-vector products bound by the bytes of weight read; this kernel reads the
int8 weight once (half of bf16's bytes) and accumulates in fp32, without converting the weight to bf16 first
(which would write and read it again). Each program computes BLOCK_N outputs of one row, walking K in
BLOCK_K-wide tiles. Triton is imported here only: `quant.py` imports this module only on CUDA (or interpreted).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _finish(acc, S, B, OUT, row, rn, n_ok, stride_o, HAS_BIAS: tl.constexpr):
    out = acc * tl.load(S + rn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        # the eager path adds the bias in the model dtype after rounding the product: round the same way
        out = out.to(OUT.dtype.element_ty).to(tl.float32) + tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + rn, out.to(OUT.dtype.element_ty), mask=n_ok)


@triton.jit
def _int8_gemv_kernel(X, W, S, B, OUT, P, M, N, K, K_SPLIT, stride_x, stride_o,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    part = tl.program_id(2)  # which K_SPLIT-wide stretch of K (SPLIT > 1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(part * K_SPLIT, tl.minimum(part * K_SPLIT + K_SPLIT, K), BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + row * stride_x + kk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(W + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if SPLIT == 1:
        _finish(acc, S, B, OUT, row, rn, n_ok, stride_o, HAS_BIAS)
    else:  # fp32 partial sums, added up in a fixed order by _reduce_kernel (deterministic, unlike atomics)
        tl.store(P + (part * M + row) * N + rn, acc, mask=n_ok)


@triton.jit
def _reduce_kernel(P, S, B, OUT, M, N, stride_o, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT: tl.constexpr):
    row = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_ok = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for part in tl.static_range(SPLIT):
        acc += tl.load(P + (part * M + row) * N + rn, mask=n_ok, other=0.0)
    _finish(acc, S, B, OUT, row, rn, n_ok, stride_o, HAS_BIAS)


def default_tiles(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, split) for an [n, k] weight, from bench/int8_tiles.py on the H200 (2026-11-29), one
    row, the 7B model's four decode shapes (int8 weight GB/s, against 16 x 512 x 4 warps before):
    gate_up 37888 x 3584: 4 x 512 x 4 (3,002 against 2,728); down 3584 x 18944: 8 x 2048 x 8 (1,679 / 1,044);
    qkv 4608 x 3584: 4 x 2048 x 4 (604 / 274); o_proj 3584 x 3584: 32 x 2048 x 4 (477 / 260). Those timings
    launched the kernel 50 times in a loop, so a narrow layer's few microseconds were mostly launch overhead;
    the bench now times CUDA graphs, as the decode step runs, and tries splitting K (`split` programs per
    output tile, for the narrow layers' too few programs on 132 SMs). Not yet re-measured: split stays 1."""
    if n >= 16384:
        return 4, 512, 4, 1
    if k >= 8192:
        return 8, 2048, 8, 1
    return (4, 2048, 4, 1) if n >= 4096 else (32, 2048, 4, 1)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (M small) -> [M, N] in x's dtype. `tiles`: (BLOCK_N, BLOCK_K, warps, split), for
    bench/int8_tiles.py; split > 1 sums K's stretches in a second kernel."""
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, split = tiles or default_tiles(n, k)
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles per stretch
    split = triton.cdiv(k, k_split)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    b = bias if bias is not None else scale
    _int8_gemv_kernel[(triton.cdiv(n, block_n), m, split)](
        x, qweight, scale, b, out, partial, m, n, k, k_split, x.stride(0), out.stride(0), BLOCK_N=block_n,
        BLOCK_K=block_k, HAS_BIAS=bias is not None, SPLIT=split, num_warps=warps)
    if split > 1:
        _reduce_kernel[(triton.cdiv(n, 1024), m)](partial, scale, b, out, m, n, out.stride(0), BLOCK=1024,
                                                  HAS_BIAS=bias is not None, SPLIT=split, num_warps=4)
    return out
