"""Qwen2 decoder (the Video-XL-2 language model), compact and cache-explicit.

Parameter names match the checkpoint's `model.*` / `lm_head.*` tensors after the loader strips `model.`:
`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`, `layers.N.mlp.{gate,up,down}_proj`,
`layers.N.{input,post_attention}_layernorm`, `norm`, `lm_head`. Attention goes through
`F.scaled_dot_product_attention` with grouped-query heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from videoxl.config import TextConfig
from videoxl.language.kv_store import KVStore


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as Qwen2 does: bf16 variance loses too much.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [len, head_dim] for the given absolute positions.

    The angles are float32 products of float32 frequencies, as in `transformers`' Qwen2 (whose rounding the
    model was trained with: at position 4e5 it is ~0.02 rad). The power and the cos/sin are taken in float64
    and rounded once, so the table does not depend on which vector or scalar float32 kernel the CPU happens to
    pick (seen here: 4e-4 differences in keys between two runs of the same prefill).
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    inv_freq = (1.0 / theta ** exponent).float()
    angles = (positions.float()[:, None] * inv_freq[None, :]).double()
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Qwen2 rotates the two halves of each head (not interleaved pairs).
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


_flex = None


def flex_attention(q, k, v, block_mask):
    """FlexAttention, compiled once on CUDA: it skips the tiles a `BlockMask` rules out. (The eager version
    computes every score; on the CPU it serves only to check the mask.)"""
    global _flex
    from torch.nn.attention.flex_attention import flex_attention as eager

    if q.device.type != "cuda":
        return eager(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _flex is None:
        # dynamic: one kernel for every sequence length (each video has its own), not a recompile per length
        _flex = torch.compile(eager, dynamic=True)
    mark_lengths_dynamic(q, k, v, block_mask)
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def mark_lengths_dynamic(q, k, v, block_mask) -> None:
    """Mark the lengths (queries, keys, and the BlockMask's tile counts) dynamic before every call. Without it,
    `dynamic=True` still specialised the first call's BlockMask sizes and compiled again at the second length
    (tests/test_flex_compile.py, through dynamo): a user's second video, or a prefill's second extension, paid
    a compile. Dims of size 1 are left alone (torch specialises those)."""
    import torch._dynamo

    for t in (q, k, v):  # [batch, heads, length, head_dim]: the length only
        if t.shape[2] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 2)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        t = getattr(block_mask, name, None)
        for d in range(2, t.dim() if t is not None else 0):  # [1, 1, tiles(, tiles)]
            if t.shape[d] > 1:
                torch._dynamo.maybe_mark_dynamic(t, d)


def flash_lower_right(q, k, v):
    """n queries after m - n cached keys, causal, through the flash kernel itself: what SDPA's lower-right
    CausalBias dispatches to on a GPU (`torch.nn.attention.bias.CausalBias._dispatch`, the same op and arguments,
    so the same bytes), without importing that module. Its import pulls in torch._dynamo, and a fresh process's
    first question paid for it inside the prefill: on an H200 host, `videoxl chat`'s dense prefill of 10 minutes
    took 5.1 s on the first question against 0.07-0.9 s otherwise. None where the flash kernel does not apply."""
    d = q.shape[-1]
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 256
            and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.get_device_capability(q.device) >= (8, 0)):
        return None
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal=True,
                                                              return_debug_mask=False, scale=1.0 / math.sqrt(d))[0]


def causal_lower_right(n: int, m: int):
    """SDPA's lower-right causal bias: n queries after m - n cached keys. Imported when first used: its module
    imports torch._dynamo, about 2 s of every start-up on a small CPU."""
    from torch.nn.attention.bias import causal_lower_right as bias

    return bias(n, m)


def attend(q, k, v, mask=None):
    """Attention of q [b, heads, n, d] over k, v [b, kv_heads, m, d] (grouped-query).

    `mask`: None = causal with the n queries at the end of the m keys; a bool tensor [n, m] (True = may
    attend); or a callable doing block-sparse attention (`prefill.BlockSparseAttention`, CUDA).
    """
    n, m = q.shape[2], k.shape[2]
    if mask is None:
        if n == m:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if n == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        # the n queries follow m - n cached keys (a question over a video's KVs): a lower-right causal bias lets
        # SDPA pick its fused (flash) kernel; an [n, m] boolean mask with grouped-query heads would take the math
        # kernel, which copies K and V once per query head (the hour's timeline on an H200 showed 0.95 s between
        # the prefill's end and the first token; not re-measured since this change)
        out = flash_lower_right(q, k, v)
        if out is not None:
            return out
        mask = causal_lower_right(n, m)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return mask(q, k, v)  # a block-sparse attention object (prefill.BlockSparseAttention)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVStore, layer: int, mask):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.append(layer, k, v)
        return self.o_proj(attend(q, k, v, mask).transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    kv_dtype: str | None = None  # None: KVs stored in the weights' dtype; "fp8" (set by `videoxl.load`)

    def new_cache(self, capacity: int = 256, offload: bool = False) -> KVStore:
        p = self.embed_tokens.weight
        return KVStore(self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim,
                       p.dtype, p.device, capacity, offload, self.kv_dtype)

    def forward(self, embeds: torch.Tensor, cache: KVStore, mask=None,
                logits_for: str = "last") -> torch.Tensor:
        """Run `embeds` [1, n, hidden] after what `cache` holds; return logits for the last position
        (`logits_for="last"`, all a generation step needs), for every position (`"all"`, for tests) or none.

        `mask` (bool [n, cached+n], True = may attend, or a block-sparse attention callable such as
        `prefill.BlockSparseAttention`) overrides plain causal attention.
        """
        n = embeds.shape[1]
        start = cache.length
        if mask is None and start > 0 and n > 1:  # once here, not in every layer's `attend`
            mask = torch.ones(n, start + n, dtype=torch.bool, device=embeds.device).tril(diagonal=start)
        positions = torch.arange(start, start + n, device=embeds.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if logits_for == "none":  # prefill: only the cache matters
            return None
        if logits_for == "last":
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()
