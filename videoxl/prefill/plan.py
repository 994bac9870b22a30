"""Chunk-based prefill settings and the block pattern they define over a prompt.

The model card's knobs map onto the reference's block pattern (its `block_size_chosed`, `prev_blocks_num`):

* `step_size` (unit: 4 frames = one group) is how far each chunk advances: the video is cut into **blocks of
  `step_size` groups**, each processed as one unit.
* `chunk_size` (unit: 4 frames) is the **attention window** a block sees: itself plus the previous
  `chunk_size // step_size - 1` blocks. So `chunk_size=4, step_size=1` (the card's example) = blocks of one
  group that see the 3 groups before them; the reference's evaluation setting (blocks of 4 groups, 3 previous
  blocks) is `chunk_size=16, step_size=4`. `step_size` must divide `chunk_size`. A smaller step means more,
  smaller, overlapping windows: smoother hand-over between chunks, more passes.

Whatever the window, as in the reference: text before the video is visible to all; every timestamp token
(`Time ...s:`) is visible to all later tokens and itself sees everything before it; tokens after the video (the
question, the answer) see everything. All of it is causal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from videoxl.config import FRAMES_PER_GROUP, settings_from_dict
from videoxl.errors import VideoXLError
from videoxl.language.prompt import VideoPrompt

# tokens per slice of the projections and MLP in layer-at-a-time prefill: bounds its activations (16384 x 18944
# bf16 = 0.6 GB); here, beside the pattern, so the memory estimate reads it without importing the kernels
STREAM_TOKENS_PER_SLICE = 16384

MODES = ("streaming", "mask")


@dataclass
class PrefillConfig:
    chunk_prefill_mode: str = "streaming"
    chunk_size: int = 4
    step_size: int = 1
    offload: bool = False
    chunk_size_for_vision_tower: int = 24

    @classmethod
    def from_dict(cls, d: dict | None) -> "PrefillConfig":
        return settings_from_dict(cls, d, "prefill_config")

    def validate(self) -> None:
        def positive_int(key):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise VideoXLError(f"prefill_config: {key} must be a positive integer, got {value!r}")

        if self.chunk_prefill_mode not in MODES:
            raise VideoXLError(f"prefill_config: chunk_prefill_mode must be one of {list(MODES)}, "
                               f"got {self.chunk_prefill_mode!r}")
        for key in ("chunk_size", "step_size", "chunk_size_for_vision_tower"):
            positive_int(key)
        if self.chunk_size % self.step_size:
            raise VideoXLError(f"prefill_config: step_size ({self.step_size}) must divide chunk_size "
                               f"({self.chunk_size})")
        if self.chunk_size_for_vision_tower % FRAMES_PER_GROUP:
            raise VideoXLError(f"prefill_config: chunk_size_for_vision_tower must be a multiple of 4 (frames), "
                               f"got {self.chunk_size_for_vision_tower}")
        if not isinstance(self.offload, bool):
            raise VideoXLError(f"prefill_config: offload must be true or false, got {self.offload!r}")

    @property
    def groups_per_block(self) -> int:
        return self.step_size

    @property
    def prev_blocks(self) -> int:
        return self.chunk_size // self.step_size - 1


@dataclass
class BlockPlan:
    """The block pattern over the first `length` tokens of a prompt (prefix + video).

    Per token: `block` (-1 before the video, else the video block it belongs to) and `open_row` / `open_col`
    (timestamp tokens; text before the video is an open column). `blocks[b] = (start, end)` token spans.
    """

    length: int
    video_start: int
    blocks: list[tuple[int, int]]
    prev_blocks: int
    block: torch.Tensor  # int32 [length]
    timestamp: torch.Tensor  # bool [length]

    @classmethod
    def from_prompt(cls, prompt: VideoPrompt, cfg: PrefillConfig) -> "BlockPlan":
        length, starts = prompt.video_end, prompt.group_starts
        step = cfg.groups_per_block
        blocks = [(starts[g], starts[g + step] if g + step < len(starts) else length)
                  for g in range(0, len(starts), step)]
        block = torch.full((length,), -1, dtype=torch.int32)
        for b, (s, e) in enumerate(blocks):
            block[s:e] = b
        timestamp = torch.zeros(length, dtype=torch.bool)
        timestamp[starts[0]:length] = True
        timestamp[torch.tensor(prompt.visual_positions, dtype=torch.long)] = False
        return cls(length, starts[0], blocks, cfg.prev_blocks, block, timestamp)

    @property
    def open_col(self) -> torch.Tensor:
        return self.timestamp | (self.block < 0)

    def window_start(self, b: int) -> int:
        return self.blocks[max(0, b - self.prev_blocks)][0]

    def dense_mask(self, device=None) -> torch.Tensor:
        """bool [length, length], True = may attend. For CPU prefill and for tests; O(length^2) memory."""
        q = torch.arange(self.length)
        blk, ts, col = self.block, self.timestamp, self.open_col
        allowed = ts[:, None] | col[None, :] | (blk[None, :] >= blk[:, None] - self.prev_blocks)
        return (allowed & (q[None, :] <= q[:, None])).to(device)

    def attention_order(self) -> torch.Tensor:
        """A token order for block-sparse attention: text before the video, then the timestamp tokens, then the
        visual tokens, each in sequence order. Attention is the same in any order once the mask follows the
        tokens; in this one the open rows and columns (timestamps: every ~150 tokens) form thin strips instead
        of touching every tile, and the window pattern of the visual tokens becomes a band of skippable tiles."""
        video = torch.arange(self.video_start, self.length)
        ts = self.timestamp[self.video_start:]
        return torch.cat([torch.arange(self.video_start), video[ts], video[~ts]])

    def mask_mod(self, device, order: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        """The pattern as a FlexAttention `mask_mod` over keys arranged in `order` (default: sequence order) and
        queries in `rows` (default: `order`; an extension's new tokens attend to all keys)."""
        order = torch.arange(self.length) if order is None else order
        rows = order if rows is None else rows
        pos = torch.arange(self.length)
        q_pos, q_blk, q_ts = (t[rows].to(device) for t in (pos, self.block, self.timestamp))
        k_pos, k_blk, k_col = (t[order].to(device) for t in (pos, self.block, self.open_col))
        prev = self.prev_blocks

        def mask_mod(b, h, q, kv):
            return (k_pos[kv] <= q_pos[q]) & (q_ts[q] | k_col[kv] | (k_blk[kv] >= q_blk[q] - prev))
        return mask_mod

    def tile_classes(self, tile: int, device=None, order: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None):
        """(partial, full): bool [q_tiles, kv_tiles] over `tile` x `tile` squares of the mask, keys arranged in
        `order` and queries in `rows` (default: `order`). A tile neither partial nor full is empty (skipped).
        Bounds per tile, so it costs O(tiles^2), never O(length^2); it may call a full or empty tile partial
        (then the mask is evaluated there), never the reverse."""
        n, prev = self.length, self.prev_blocks
        order = torch.arange(n) if order is None else order
        rows = order if rows is None else rows
        big = torch.iinfo(torch.int64).max

        def tiles(values: torch.Tensor, fill, idx: torch.Tensor) -> torch.Tensor:  # -> [tiles, tile], padded
            v = values[idx].to(device)
            return torch.cat([v, torch.full((-len(idx) % tile,), fill, dtype=v.dtype, device=device)]).view(-1, tile)

        pos = torch.arange(n)
        ts_rows, open_cols = tiles(self.timestamp, False, rows), tiles(self.open_col, False, order)
        blk = self.block.to(torch.int64)
        lo = tiles(blk - prev, -big, rows)  # lowest block a row may see; padding rows constrain nothing
        rows_min, rows_max = tiles(pos, big, rows).amin(1), tiles(pos, -1, rows).amax(1)
        cols_min, cols_max = tiles(pos, big, order).amin(1), tiles(pos, -1, order).amax(1)
        # the strictest and the loosest window bound among a tile's non-timestamp rows
        lo_max = torch.where(ts_rows, -big, lo).amax(1)
        lo_min = torch.where(ts_rows, big, lo).amin(1)
        blk_min, blk_max = tiles(blk, big, order).amin(1)[None, :], tiles(blk, -big, order).amax(1)[None, :]
        above = cols_min[None, :] > rows_max[:, None]  # every column after every row
        below = cols_max[None, :] <= rows_min[:, None]  # every column at or before every row
        any_ts, all_ts = ts_rows.any(1)[:, None], ts_rows.all(1)[:, None]
        any_open, all_open = open_cols.any(1)[None, :], open_cols.all(1)[None, :]
        none = above | (~any_ts & ~any_open & (blk_max < lo_min[:, None]))
        full = below & (all_ts | all_open | (blk_min >= lo_max[:, None]))
        return ~none & ~full, full

    def visible_columns(self, b: int) -> torch.Tensor:
        """Columns the non-timestamp rows of block b may see (before the causal cut): the text before the
        video, timestamp tokens before the window, and the window itself up to the block's end."""
        w, end = self.window_start(b), self.blocks[b][1]
        before = torch.arange(self.video_start)
        stamps = torch.nonzero(self.timestamp[self.video_start:w]).flatten() + self.video_start
        return torch.cat([before, stamps, torch.arange(w, end)])

    def attended_share(self) -> float:
        """Attention pairs computed / pairs of full causal attention, over the prefilled tokens."""
        n = self.length
        ts = self.timestamp.numpy()
        pairs = self.video_start * (self.video_start + 1) // 2
        for b, (s, e) in enumerate(self.blocks):
            rows = np.arange(s, e)
            w = self.window_start(b)
            far = self.video_start + int(ts[self.video_start:w].sum())  # open columns before the window
            seen = np.where(ts[s:e], rows + 1, far + rows - w + 1)
            pairs += int(seen.sum())
        return pairs / (n * (n + 1) // 2)
