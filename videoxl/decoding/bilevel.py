"""Bi-level KV decoding (`enable_sparse`): the blocks the question needs keep their dense KVs, the rest a pooled
summary, and the question and the answer run over that mixed cache.

Per question, from the prefilled video's store (on the GPU or offloaded) and its block plan:
1. The sparse level, made once per video and kept: per group, its timestamp tokens' KVs plus its visual KVs
   averaged over windows of `compression` tokens, keys first un-rotated to no position (RoPE is a rotation),
   per layer and KV head.
2. Relevance, in the model: the question runs once over [text before the video, every block sparse]; each
   block's score is the attention mass the question's tokens put on it, summed over heads and the upper half of
   the layers (the lower layers attend mostly by position and to nearby text; the upper ones retrieve by
   content), so it uses the model's own queries and keys at the positions it will see them.
3. Dense: the first and the last block, the blocks overlapping `dense_times`, then the best-scored blocks until
   the budget is reached (`select="random"`: blocks drawn at random instead, a baseline for measuring step 2).
   The mixed cache is [text before the video, each block dense or sparse in time order], renumbered compactly
   from 0 with every key rotated to its new position; only the dense blocks' KVs are read from the store
   (from CPU memory if offloaded), so the GPU holds the budget's share, not the video.
4. The question is forwarded over the mixed cache; decoding goes on from there with the usual step.
With every block dense the mixed cache is the store itself, position for position.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from videoxl.cancel import Cancel, check
from videoxl.prefill.plan import BlockPlan
from videoxl.language.decoder import Qwen2Decoder, apply_rope, rope_cos_sin
from videoxl.language.kv_store import KVStore
from videoxl.decoding import bucketed, decode_step
from videoxl.decoding.sparse_config import SparseConfig
from videoxl.decoding.state import DecodeState

QUESTION_ROOM = 512  # tokens a prepared mixed store keeps for the question (a longer one reallocates it)


class SparseLevel:
    """The pooled KVs of a prefilled video (step 1), with the map from tokens to their pooled slots. A video that
    grew by whole groups (a live session) is pooled on from where it stopped (`extend`): a group's slots depend on
    its own tokens only, and the KVs of earlier tokens never change."""

    def __init__(self, decoder: Qwen2Decoder, store: KVStore, plan: BlockPlan, compression: int):
        self.compression, self.length = compression, plan.video_start
        self.slot_block = np.zeros(0, dtype=np.int64)
        self.k, self.v = [], []
        self.extend(decoder, store, plan)

    def extend(self, decoder: Qwen2Decoder, store: KVStore, plan: BlockPlan) -> None:
        """Pool the tokens from `self.length` (a group's start) to the end of `plan`'s video."""
        lo, n, compression = self.length, plan.length, self.compression
        if n > lo:
            ts = plan.timestamp[lo:n].numpy()
            idx = np.arange(n - lo)
            run_start = ~ts & np.concatenate([[True], ts[:-1]])  # first visual token after a timestamp
            start_of_run = np.maximum.accumulate(np.where(run_start, idx, 0))
            begins = ts | (~ts & ((idx - start_of_run) % compression == 0))
            slot = np.cumsum(begins) - 1
            self.slot_block = np.concatenate([self.slot_block, plan.block[lo:n].numpy()[begins]])
            self._pool(decoder, store, lo, n, slot, int(slot[-1]) + 1)
        self.block_slots = [(int(a), int(b)) for a, b in zip(
            np.searchsorted(self.slot_block, np.arange(len(plan.blocks)), "left"),
            np.searchsorted(self.slot_block, np.arange(len(plan.blocks)), "right"))]
        self.slots, self.length = len(self.slot_block), n

    def _pool(self, decoder, store: KVStore, lo: int, n: int, slot: np.ndarray, slots: int) -> None:
        device = decoder.embed_tokens.weight.device
        slot_t = torch.from_numpy(slot).to(device)
        counts = torch.bincount(slot_t, minlength=slots).float()[None, :, None]
        cfg = decoder.cfg
        cos, sin = rope_cos_sin(-torch.arange(lo, n, device=device), cfg.head_dim, cfg.rope_theta, torch.float32)
        for layer in range(cfg.num_hidden_layers):
            k, v = store.gather(layer, [(lo, n)], device)
            raw = apply_rope(k.float(), cos, sin)  # back to no position
            shape = (k.shape[0], slots, k.shape[2])
            k = (torch.zeros(shape, device=device).index_add_(1, slot_t, raw) / counts).to(k.dtype)
            v = (torch.zeros(shape, device=device).index_add_(1, slot_t, v.float()) / counts).to(v.dtype)
            if layer < len(self.k):
                self.k[layer], self.v[layer] = torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)
            else:
                self.k.append(k), self.v.append(v)


def sparse_level(decoder, store: KVStore, compression: int, state: DecodeState) -> SparseLevel:
    level = state.level
    if level is None or level.compression != compression or level.length > store.plan.length:
        state.level = None  # one compression at a time: the level is a quarter of the video's KVs
        state.level = SparseLevel(decoder, store, store.plan, compression)
    elif level.length < store.plan.length:  # the video grew (live)
        level.extend(decoder, store, store.plan)
    return state.level


def block_times(plan: BlockPlan, timestamps: list[float], groups_per_block: int) -> list[tuple[float, float]]:
    """[first frame's, last frame's] timestamp of each block."""
    frames = len(timestamps)
    per_block = 4 * groups_per_block
    return [(timestamps[b * per_block], timestamps[min((b + 1) * per_block, frames) - 1])
            for b in range(len(plan.blocks))]


def mixed_store(decoder: Qwen2Decoder, store: KVStore, level: SparseLevel | None, dense: set[int],
                extra: int, reuse: KVStore | None = None, cancel: Cancel | None = None) -> tuple:
    """A GPU store [prefix, blocks dense or sparse in time order] (step 3), with room for `extra` tokens, and the
    block of each of its positions (-1: text before the video). `level` may be None if all are dense. `reuse`:
    a store to overwrite if it is large enough (the previous question's: its captured decode graph stays valid)."""
    plan = store.plan
    vs = plan.video_start
    dense_src, dense_dst, sparse_src, sparse_dst, owner = [np.arange(vs)], [np.arange(vs)], [], [], [np.full(vs, -1)]
    at = vs
    for b, (s, e) in enumerate(plan.blocks):
        start = at
        if b in dense:
            dense_src.append(np.arange(s, e))
            at += e - s
            dense_dst.append(np.arange(start, at))
        else:
            lo, hi = level.block_slots[b]
            sparse_src.append(np.arange(lo, hi))
            at += hi - lo
            sparse_dst.append(np.arange(start, at))
        owner.append(np.full(at - start, b))
    device = decoder.embed_tokens.weight.device
    cfg = decoder.cfg
    if reuse is not None and reuse.capacity >= at + extra:
        mixed = reuse
        mixed.set_length(0)
    else:
        mixed = KVStore(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, store.dtype, device,
                        bucketed(at + extra), kv_dtype=store.kv_dtype)  # an fp8 video's mixed store is fp8 too
    spans = []
    for s, e in [(0, vs)] + [plan.blocks[b] for b in sorted(dense)]:
        if spans and spans[-1][1] == s:  # neighbouring dense blocks travel as one copy
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    d_src, d_dst = (torch.from_numpy(np.concatenate(a)).to(device) for a in (dense_src, dense_dst))
    d_cos, d_sin = rope_cos_sin(d_dst - d_src, cfg.head_dim, cfg.rope_theta, torch.float32)
    if sparse_src:
        s_src, s_dst = (torch.from_numpy(np.concatenate(a)).to(device) for a in (sparse_src, sparse_dst))
        s_cos, s_sin = rope_cos_sin(s_dst, cfg.head_dim, cfg.rope_theta, torch.float32)
    for layer in range(cfg.num_hidden_layers):
        check(cancel)
        k_out, v_out = mixed.layer_slot(layer, at)
        k, v = store.gather(layer, spans, device)
        # a dense key moves by (new - old) positions; where they agree the rotation is by 0 and exact
        k_out[0, :, d_dst] = apply_rope(k.float(), d_cos, d_sin).to(k.dtype)
        v_out[0, :, d_dst] = v
        if sparse_src:
            k_out[0, :, s_dst] = apply_rope(level.k[layer][:, s_src].float(), s_cos, s_sin).to(k.dtype)
            v_out[0, :, s_dst] = level.v[layer][:, s_src]
        mixed.commit(layer, at)
    return mixed, torch.from_numpy(np.concatenate(owner)).to(device)


class AttentionMass:
    """Plain causal attention for the question's tokens over the cache (a `mask` callable for the decoder) that
    adds up, at the scoring layers, how much attention each block receives."""

    def __init__(self, owner: torch.Tensor, blocks: int, layers: range):
        self.owner, self.layers, self.layer = owner, layers, 0
        self.scores = torch.zeros(blocks + 1, device=owner.device)  # the last slot collects non-video keys

    def __call__(self, q, k, v):
        b, heads, n, d = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        # each KV head's query heads stacked along the rows: grouped-query attention without expanding K/V
        qg = q.reshape(b, kv_heads, groups * n, d).float()
        logits = qg @ k.float().transpose(-1, -2) * d ** -0.5
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1).repeat(groups, 1)
        p = logits.masked_fill(future, float("-inf")).softmax(-1)
        if self.layer in self.layers:
            mass = p.sum(dim=(0, 1, 2))  # over heads and question tokens: [m]
            owner = torch.cat([self.owner, torch.full((m - len(self.owner),), -1, device=q.device)])
            self.scores.index_add_(0, torch.where(owner < 0, len(self.scores) - 1, owner), mass)
        self.layer += 1
        return (p @ v.float()).reshape(b, heads, n, d).to(q.dtype)


def _mixed_size(plan: BlockPlan, level: SparseLevel | None, dense: set[int]) -> int:
    return plan.video_start + sum((e - s) if b in dense else (level.block_slots[b][1] - level.block_slots[b][0])
                                  for b, (s, e) in enumerate(plan.blocks))


def prepare_bilevel(decoder: Qwen2Decoder, store: KVStore, cfg: SparseConfig, max_new_tokens: int,
                    state: DecodeState) -> float:
    """What does not depend on the question, done once per video: the sparse level, a mixed store large enough
    for the budget's biggest blocks, and (on CUDA) its captured decode step, so that a question pays only for
    its relevance pass, its blocks' copies and its tokens. Returns the seconds it took (0: already done)."""
    plan = store.plan
    n_blocks = len(plan.blocks)
    want = cfg.dense_count(n_blocks)
    if state.mixed is not None and (want >= n_blocks or (state.level and state.level.compression == cfg.compression)):
        return 0.0
    t0 = time.perf_counter()
    if want >= n_blocks:
        size = plan.length
    else:
        level = sparse_level(decoder, store, cfg.compression, state)
        growth = sorted(((e - s) - (level.block_slots[b][1] - level.block_slots[b][0])
                         for b, (s, e) in enumerate(plan.blocks)), reverse=True)
        size = _mixed_size(plan, level, set()) + sum(growth[:want])
    state.drop_mixed()
    dc = decoder.cfg
    mixed = KVStore(dc.num_hidden_layers, dc.num_key_value_heads, dc.head_dim, store.dtype,
                    decoder.embed_tokens.weight.device, bucketed(size + QUESTION_ROOM + max_new_tokens + 1),
                    kv_dtype=store.kv_dtype)
    state.mixed = mixed
    decode_step(decoder, mixed, max_new_tokens, state=state)  # the graph captured now, on the store questions reuse
    return time.perf_counter() - t0


def bilevel_question(decoder: Qwen2Decoder, store: KVStore, tail: torch.Tensor, cfg: SparseConfig,
                     timestamps: list[float], groups_per_block: int, max_new_tokens: int,
                     state: DecodeState | None = None, cancel: Cancel | None = None):
    """Forward the question's tokens `tail` [n] over the bi-level cache of `store` (a prefilled video: prefix
    and blocks only). Returns (mixed store, logits of the last position, stats). `state` is the video's decode
    state (its cache entry's), which keeps the pooled level and mixed store for its next question."""
    state = DecodeState() if state is None else state
    check(cancel)
    prepare_s = prepare_bilevel(decoder, store, cfg, max_new_tokens, state)
    check(cancel)
    t0 = time.perf_counter()
    plan = store.plan
    n_blocks = len(plan.blocks)
    times = block_times(plan, timestamps, groups_per_block)
    forced = {0, n_blocks - 1} | {b for b, (s, e) in enumerate(times)
                                  for lo, hi in cfg.dense_times if s <= hi and e >= lo}
    want = max(cfg.dense_count(n_blocks), len(forced))
    embeds = decoder.embed_tokens(tail)[None]
    extra = len(tail) + max_new_tokens + 1
    scores, level = None, None
    mixed = state.drop_mixed()  # reused for the relevance pass, then for the answer's cache
    if want >= n_blocks:
        dense = set(range(n_blocks))
    elif cfg.select == "random":  # a baseline: no relevance pass, the rest of the budget drawn at random
        level = sparse_level(decoder, store, cfg.compression, state)
        ranked = [b for b in np.random.default_rng(cfg.seed).permutation(n_blocks).tolist() if b not in forced]
        dense = forced | set(ranked[:want - len(forced)])
    else:
        level = sparse_level(decoder, store, cfg.compression, state)
        if mixed is not None and mixed.capacity < _mixed_size(plan, level, forced) + len(tail):
            mixed = None  # freed before a larger one is made
        mixed, owner = mixed_store(decoder, store, level, forced, len(tail), mixed, cancel)
        layers = decoder.cfg.num_hidden_layers
        mass = AttentionMass(owner, n_blocks, range(layers // 2, layers))
        check(cancel)
        decoder(embeds, mixed, mask=mass, logits_for="none")
        check(cancel)
        scores = mass.scores[:n_blocks].float().cpu()
        ranked = [b for b in scores.argsort(descending=True).tolist() if b not in forced]
        dense = forced | set(ranked[:want - len(forced)])
    if mixed is not None and mixed.capacity < _mixed_size(plan, level, dense) + extra:
        mixed = None
    mixed, _ = mixed_store(decoder, store, level, dense, extra, mixed, cancel)
    state.mixed = mixed
    kept = mixed.length / plan.length
    logits = decoder(embeds, mixed)
    stats = {"dense_blocks": [list(times[b]) for b in sorted(dense)], "blocks": n_blocks,
             "kept_share": round(kept, 4), "bilevel_s": round(time.perf_counter() - t0, 3),
             "bilevel_prepare_s": round(prepare_s, 3)}
    if scores is not None:
        stats["block_scores"] = [round(float(x), 4) for x in scores]
    return mixed, logits, stats
