"""Incremental prefill: a KV store of the prefix + video that grows as the video's tokens arrive.

Live video (a session that is asked about a video still being recorded) and a prefill that runs while frames
are still being decoded both need the same thing: the KVs of the tokens so far, extended by the next ones,
equal to what a one-shot prefill of all of them gives (prefill/modes.py).

That holds because every pattern here is causal: a token's KVs depend only on the tokens before it. Dense
attention is plain causal. The chunked pattern (plan.py) is block-causal: a visual token sees the text before
the video, every earlier `Time ...s:` token and its window (its own block and the previous
`chunk_size // step_size - 1`), all of which come before it; a timestamp token sees everything before it. So a
new range of tokens can be run through the layers against the stored KVs, and nothing stored changes. The range
may end anywhere, even inside a block: a block's later tokens see its earlier ones through the store, exactly
as they would in one pass. 'mask' and 'streaming' are two ways to compute one pattern; here both are the same.

Each extension is one forward pass of the new tokens (`Qwen2Decoder.forward`): per layer, their K/V go into the
store, then their queries attend to the stored K/V of that layer. With offload the store streams each layer in
from CPU memory, the next layer's copy behind this one's compute (KVStore.append). The chunked pattern's
timestamp rows see every earlier token, so each extension reads the whole store once, whatever the mode.
"""
from __future__ import annotations

import torch

from videoxl.errors import VideoXLError
from videoxl.language.decoder import Qwen2Decoder
from videoxl.language.kv_store import KVStore
from videoxl.language.prompt import VideoPrompt
from videoxl.prefill.modes import BlockSparseAttention, block_attention, flex_available
from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.prefill.run import prefill


class IncrementalPrefill:
    """Owns `store`, the KVs of `prompt.input_ids[:store.length]`. `extend(prompt, embeds)` prefills the tokens
    from `store.length` to `prompt.video_end`; `prompt` is the same prompt grown (language.prompt.add_group).

    `chunking` None = dense (causal); otherwise its mode's pattern, `offload` keeping the KVs in CPU memory.
    Not thread-safe: its owner serialises extensions and the questions that read the store."""

    def __init__(self, decoder: Qwen2Decoder, chunking: PrefillConfig | None = None, capacity: int = 1024,
                 offload: bool | None = None):
        self.decoder, self.chunking = decoder, chunking
        if offload is None:
            offload = bool(chunking and chunking.offload)
        self.store: KVStore = decoder.new_cache(capacity=capacity, offload=offload)
        self.plan: BlockPlan | None = None
        self._video_len = 0

    @property
    def length(self) -> int:
        """Tokens prefilled (a question's tokens after them are dropped by the next `extend`)."""
        return self._video_len

    def fill(self, prompt: VideoPrompt, embeds: torch.Tensor, show_progress=False, cancel=None) -> dict:
        """Prefill the whole prompt, tokens [0, video_end), in one pass of the mode's one-shot prefill (run.py),
        replacing what is stored: for a chunked pattern on CUDA one block-sparse kernel beats extensions.
        Returns the prefill's stats."""
        if prompt.video_end != embeds.shape[1]:
            raise VideoXLError(f"one-shot prefill: {embeds.shape[1]} tokens for a prompt of {prompt.video_end}")
        self._video_len = 0  # (what was stored goes, whether or not this succeeds)
        self.store.truncate(0)
        self.store.reserve(prompt.video_end)
        stats = prefill(self.decoder, embeds, self.store, prompt, self.chunking, show_progress, cancel)
        self.plan, self._video_len = self.store.plan, prompt.video_end
        return stats

    def extend(self, prompt: VideoPrompt, embeds: torch.Tensor) -> int:
        """Prefill `embeds` [1, n, hidden], the embeddings of prompt tokens [length, length + n); `prompt`
        ends there (`video_end`). Returns the new length."""
        start, n = self._video_len, embeds.shape[1]
        if prompt.video_end != start + n:
            raise VideoXLError(f"incremental prefill: {n} new tokens after {start} do not reach the prompt's "
                               f"end ({prompt.video_end})")
        if n == 0:
            return start
        store = self.store
        store.truncate(start)  # a question asked in between left its tokens after the video
        store.reserve(start + n)
        # dense: None = causal with the new rows at the end of the keys (`attend` runs a fused lower-right
        # causal kernel; a [n, start + n] boolean mask with grouped-query heads would take the math kernel)
        mask = None
        if self.chunking is not None and prompt.group_starts:  # text before the video: plain causal
            self.plan = BlockPlan.from_prompt(prompt, self.chunking)
            mask = BlockSparseAttention(self.plan, embeds.device, rows=slice(start, start + n)) \
                if flex_extensions(embeds.device) else RowsOfPattern(self.plan, start)
        self.decoder(embeds, store, mask=mask, logits_for="none")
        store.synchronize()
        store.plan = self.plan
        self._video_len = start + n
        return self._video_len


# An extension's chunked rows as one FlexAttention kernel (BlockSparseAttention over the new rows against every
# key) instead of block by block (RowsOfPattern). Off: measured on the H200 (bench/e2e.py --flex-extensions,
# bench/RESULTS.md), the hour's 16 extensions took 19.2 s of GPU-span time against 5.7 s for the one-shot
# kernel and slowed frame decoding by 9 s; block by block was slower still (5.2 s against 0.85 s per 10 min).
FLEX_EXTENSIONS = False


def flex_extensions(device) -> bool:
    return FLEX_EXTENSIONS and flex_available(device)


class RowsOfPattern:
    """The block pattern's attention for query rows [start, start + n) against keys [0, start + n), as the
    decoder's `mask` callable: the same block-by-block SDPA as streaming prefill on the CPU (block_attention),
    which gathers only a visual row's visible columns."""

    def __init__(self, plan: BlockPlan, start: int):
        self.plan, self.start = plan, start

    def __call__(self, q, k, v):
        rows = slice(self.start, self.start + q.shape[2])
        return block_attention(self.plan, lambda _: q, k, v, rows)
