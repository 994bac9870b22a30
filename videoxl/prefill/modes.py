"""Prefill of the prefix + video into the KV store: dense, or chunk-based ('mask' / 'streaming').

* dense: causal (flash) attention over everything, computed a layer at a time like 'streaming' below.
* 'mask': one forward pass over the whole sequence with the block pattern of `chunking.BlockPlan`. On CUDA the
  pattern is a FlexAttention `BlockMask`, so the tiles it rules out are never computed; on CPU it is a dense
  boolean mask for SDPA (the reference's approach: same numbers, no savings).
* 'streaming': the same pattern, computed a layer at a time: a layer's K/V for every token (in slices), then
  the pattern's attention (the BlockMask kernel on CUDA; on CPU block by block, each block's rows against only
  the columns it may see), then the MLP in slices. Only one layer's K/V must be on the GPU at once, so with
  `offload=True` each finished layer goes to CPU memory behind the next layer's compute and never comes back
  during prefill. Activations: the hidden states, one layer's queries and attention output (each tokens x
  hidden, the size of the input embeddings), and MLP intermediates of one slice only.
  (Block-major order would need, for every timestamp token, *all* earlier KVs on the GPU again: the pattern
  lets timestamp rows see everything before them.)
All three give the same KVs up to float rounding; tests hold them to that.
"""
from __future__ import annotations

import torch

from videoxl.cancel import Cancel, check
from videoxl.prefill.plan import STREAM_TOKENS_PER_SLICE, BlockPlan
from videoxl.language.decoder import (Qwen2Decoder, apply_rope, attend, flex_attention,
                                      rope_cos_sin)
from videoxl.language.kv_store import KVStore



def flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


class BlockSparseAttention:
    """The plan's pattern as a FlexAttention BlockMask over tokens in `plan.attention_order()`: q, k, v are
    gathered into that order, attended, and the output put back. Tiles the pattern rules out are skipped, fully
    visible tiles run without a mask, only partial tiles evaluate `mask_mod`. The BlockMask comes from per-tile
    bounds (`BlockPlan.tile_classes`) rather than `create_block_mask`, which evaluates the mask at all
    length^2 positions and, compiled, took minutes on an H200.

    `rows`: the queries are only these tokens (an extension's new tokens, incremental.py) against every key;
    they are arranged timestamps first, so the open rows form one strip."""

    def __init__(self, plan: BlockPlan, device: torch.device, tile: int = 128, rows: slice | None = None):
        from torch.nn.attention.flex_attention import BlockMask

        order = plan.attention_order()
        if rows is None:
            q_order, start = order, 0
        else:
            idx = torch.arange(rows.start, rows.stop)
            ts = plan.timestamp[rows]
            q_order, start = torch.cat([idx[ts], idx[~ts]]), rows.start
        partial, full = plan.tile_classes(tile, device, order, q_order)
        kv_num, kv_idx = self._as_indices(partial)
        full_num, full_idx = self._as_indices(full)
        self.mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile,
                                             mask_mod=plan.mask_mod(device, order, q_order),
                                             seq_lengths=(len(q_order), plan.length))
        self.order = order.to(device)
        self.q_order = (q_order - start).to(device)
        self.q_inverse = torch.argsort(q_order).to(device)

    @staticmethod
    def _as_indices(cls: torch.Tensor):
        counts = cls.sum(1, dtype=torch.int32)[None, None]
        order = torch.argsort((~cls).to(torch.int8), dim=1, stable=True).to(torch.int32)[None, None]
        return counts, order

    def __call__(self, q, k, v):
        o = self.order
        out = flex_attention(q[:, :, self.q_order], k[:, :, o], v[:, :, o], self.mask)
        return out[:, :, self.q_inverse]


def whole_layer_attention(mask=None):
    """Attention for all of a layer's queries in one kernel call: causal (flash) or a FlexAttention BlockMask."""
    def attention(queries, k_all, v_all, slices):
        q = torch.cat([queries(s) for s in slices], dim=2)
        out = attend(q, k_all, v_all, mask)
        return [out[:, :, s] for s in slices]
    return attention


def dense_prefill(decoder: Qwen2Decoder, embeds: torch.Tensor, store: KVStore, on_layer=None,
                  cancel: Cancel | None = None) -> None:
    """Plain causal prefill, a layer at a time (flash attention over the whole sequence, MLP in slices)."""
    layerwise_prefill(decoder, embeds, store, whole_layer_attention(), on_layer, cancel)


def mask_prefill(decoder: Qwen2Decoder, embeds: torch.Tensor, store: KVStore, plan: BlockPlan,
                 cancel: Cancel | None = None) -> None:
    """One forward pass: `cancel` is looked at before and after it (the demo and tests use 'streaming')."""
    assert store.length == 0 and embeds.shape[1] == plan.length
    device = embeds.device
    mask = BlockSparseAttention(plan, device) if flex_available(device) else plan.dense_mask(device)
    check(cancel)
    decoder(embeds, store, mask=mask, logits_for="none")
    check(cancel)


def streaming_prefill(decoder: Qwen2Decoder, embeds: torch.Tensor, store: KVStore, plan: BlockPlan,
                      on_layer=None, cancel: Cancel | None = None) -> None:
    assert embeds.shape[1] == plan.length
    if flex_available(embeds.device):  # one block-sparse kernel over the whole layer
        attention = whole_layer_attention(BlockSparseAttention(plan, embeds.device))
    else:
        def attention(queries, k_all, v_all, slices):
            return [block_attention(plan, queries, k_all, v_all, s, cancel) for s in slices]
    layerwise_prefill(decoder, embeds, store, attention, on_layer, cancel)


def layerwise_prefill(decoder: Qwen2Decoder, embeds: torch.Tensor, store: KVStore, attention,
                      on_layer=None, cancel: Cancel | None = None) -> None:
    """Run the decoder a layer at a time over all tokens: that layer's K/V for every token (in slices), then
    `attention(queries, k_all, v_all, slices)` -> outputs per slice, then the MLP in slices. Only one layer's
    K/V must be on the GPU at a time; `store.commit` sends it home (CPU with offload) behind the layer's attention."""
    assert store.length == 0
    n, device = embeds.shape[1], embeds.device
    h = embeds[0].clone()  # [n, hidden], updated in place layer by layer
    cfg = decoder.cfg
    cos, sin = rope_cos_sin(torch.arange(n, device=device), cfg.head_dim, cfg.rope_theta, h.dtype)
    slices = [slice(s, min(s + STREAM_TOKENS_PER_SLICE, n)) for s in range(0, n, STREAM_TOKENS_PER_SLICE)]
    for i, layer in enumerate(decoder.layers):
        check(cancel)
        attn = layer.self_attn
        k_all, v_all = store.layer_slot(i, n)
        for s in slices:
            x = layer.input_layernorm(h[s])[None]
            k_all[:, :, s] = apply_rope(heads(attn.k_proj(x), attn.n_kv), cos[s], sin[s])
            v_all[:, :, s] = heads(attn.v_proj(x), attn.n_kv)
        # final now: stored (with offload, sent home behind this layer's attention), and read back as stored
        k_all, v_all = store.commit(i, n)

        def queries(s):
            return apply_rope(heads(attn.q_proj(layer.input_layernorm(h[s])[None]), attn.n_heads), cos[s], sin[s])

        attn_out = attention(queries, k_all, v_all, slices)
        for s, o in zip(slices, attn_out):
            h[s] += attn.o_proj(o.transpose(1, 2).reshape(1, s.stop - s.start, -1))[0]
            h[s] += layer.mlp(layer.post_attention_layernorm(h[s]))
        del attn_out, k_all, v_all
        if on_layer is not None:
            on_layer(i)
    store.synchronize()


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[1, n, n_heads * d] -> [1, n_heads, n, d]"""
    return x.view(1, x.shape[1], n_heads, -1).transpose(1, 2)


def block_attention(plan: BlockPlan, queries, k_all, v_all, rows: slice, cancel: Cancel | None = None) -> torch.Tensor:
    """Attention output [1, heads, rows, d] for the rows in `rows`, the pattern applied block by block with
    SDPA: each block's rows against only the columns it may see (gathered), timestamp rows against all."""
    q = queries(rows)
    out = torch.empty_like(q)
    device = q.device
    spans = [(0, plan.video_start, None)] + [(s, e, b) for b, (s, e) in enumerate(plan.blocks)]
    for s, e, b in spans:
        check(cancel)
        s, e = max(s, rows.start), min(e, rows.stop)
        if s >= e:
            continue
        local = slice(s - rows.start, e - rows.start)
        if b is None:  # text before the video: plain causal
            out[:, :, local] = attend(q[:, :, local], k_all[:, :, :e], v_all[:, :, :e])
            continue
        cols = plan.visible_columns(b).to(device)
        cols = cols[cols < e]
        causal = cols[None, :] <= torch.arange(s, e, device=device)[:, None]
        out[:, :, local] = attend(q[:, :, local], k_all[:, :, cols], v_all[:, :, cols], causal)
        # timestamp rows see every earlier token: each run of them (a group's `Time ...s:`) is causal against
        # all keys up to its last row, which a lower-right causal bias gives the fused (flash) kernel; a boolean
        # mask over every key would run the math kernel, which copies K/V for each grouped-query head
        for a, b in runs(torch.nonzero(plan.timestamp[s:e]).flatten().tolist()):
            a, b = a + s, b + s
            local = slice(a - rows.start, b - rows.start)
            out[:, :, local] = attend(q[:, :, local], k_all[:, :, :b], v_all[:, :, :b])  # lower-right causal
    return out


def runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> [start, stop) spans of consecutive ones."""
    spans: list[tuple[int, int]] = []
    for p in positions:
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1)
        else:
            spans.append((p, p + 1))
    return spans
