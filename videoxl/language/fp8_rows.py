"""Row-wise FP8 quantization of activations in one pass: x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]), each row
scaled so its largest magnitude maps to 448 (the largest finite e4m3). Unfused, PyTorch's abs, amax, divide,
clamp and cast make six passes over x; measured on the H200 (bench/vision_fp8.py), fp8 vision with them ran at
0.43x bf16's speed, the GEMMs' gain lost to these passes. One program per row reads it twice (the second time
from L2) and writes a byte per element. Triton is imported here only (CUDA, or interpreted in the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
BLOCK_K = 1024


@triton.jit
def _rows_kernel(X, Q, S, K, stride_x, stride_q, FP8_MAX: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_x + kk, mask=kk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, 1e-12)
    tl.store(S + row, scale)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_x + kk, mask=kk < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(Q + row * stride_q + kk, q.to(Q.dtype.element_ty), mask=kk < K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 [M, 1]), as quant.QuantLinear's fp8 path computes them unfused."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), FP8_MAX=FP8_MAX, BLOCK_K=BLOCK_K, num_warps=4)
    return q, s
