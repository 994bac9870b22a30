"""The video's prefix, grown while frames arrive: its prompt and its KVs, a run of groups at a time.

One mechanism for two callers:
- a file (pipeline.build_prefix): each slice of frames is prefilled as soon as the vision tower has encoded it,
  while the next slices are still being decoded, so the first token comes shortly after the last frame;
- a live session (live/session.py): each append's whole groups are prefilled as they come.

Both rest on `IncrementalPrefill` (incremental.py): the KVs after any split equal a one-shot prefill's.
"""
from __future__ import annotations

import bisect

import torch

from videoxl.language.prompt import VideoPrompt, add_group, start_prompt
from videoxl.prefill.incremental import IncrementalPrefill
from videoxl.prefill.modes import flex_available
from videoxl.prefill.plan import PrefillConfig


# An experiment, off (None): prefill a file's video in two extensions, the first once this share of its planned
# frames is encoded, the rest after the last frame, instead of slice by slice (dense, CPU) or in one pass after
# the last frame (chunked modes on CUDA). Beside the decoder threads every small kernel launch waits for the GIL
# (bench/RESULTS.md, seventh session: 16 extensions 32.5 s, one pass 6.9 s), so two large extensions may keep
# most of the overlap at a fraction of the launches. Not yet measured on a GPU: `bench/e2e.py --prefill-split`.
PREFILL_SPLIT: float | None = None


def prefill_as_encoded(device: torch.device, chunking: PrefillConfig | None) -> bool:
    """Whether a file's slices should be prefilled as they are encoded. Not for a chunked pattern on CUDA: there
    the one-shot prefill runs the whole pattern as one block-sparse FlexAttention kernel, while an extension
    runs it block by block (incremental.RowsOfPattern); measured on an H200 (bench/RESULTS.md, 2026-11-29), 10
    minutes of mask 16/4 took 5.2 s of GPU time in extensions against 0.85 s in one shot, more than the overlap
    saves. Dense extensions are one flash call each, as fast as one shot. With PREFILL_SPLIT set, every mode
    (the experiment's two extensions)."""
    return PREFILL_SPLIT is not None or chunking is None or not flex_available(device)


def extend_now(encoded: int, planned: int, groups_in: int, more_waiting: bool) -> bool:
    """Whether a file's encoded slices should be prefilled now, where they are prefilled as encoded: slice by
    slice, not while more decoded frames wait (they go through together); with PREFILL_SPLIT once, at its share."""
    if PREFILL_SPLIT is not None:
        return groups_in == 0 and encoded >= PREFILL_SPLIT * planned
    return not more_waiting


def embed_prompt(decoder, prompt: VideoPrompt, visual: torch.Tensor, end: int | None = None,
                 start: int = 0) -> torch.Tensor:
    """Token embeddings [1, n, hidden] of the prompt's tokens [start, end), visual positions filled in
    (`visual`: the visual tokens of the groups from `start` on; a growing prefix embeds its new groups only)."""
    device = decoder.embed_tokens.weight.device
    embeds = decoder.embed_tokens(torch.tensor(prompt.input_ids[start:end], device=device))
    first = bisect.bisect_left(prompt.visual_positions, start)
    embeds[torch.tensor(prompt.visual_positions[first:], dtype=torch.long, device=device) - start] = \
        visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
    return embeds[None]


class GrowingPrefix:
    """`prompt` (text before the video, then `Time {t}s:` + visual placeholders per group, no question) and
    `prefill.store`, the KVs of all of it. `add(visual, group_times)` appends groups and prefills them; a
    failure (out of memory, a cancel) leaves both as they were before the call.

    Not thread-safe: the owner serialises `add` and the questions that read the store."""

    def __init__(self, decoder, tokenizer, tokens_per_group: int, placeholder: int,
                 chunking: PrefillConfig | None, capacity: int = 1024, offload: bool | None = None,
                 system: str | None = None):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.tokens_per_group, self.placeholder = tokens_per_group, placeholder
        self.prompt = start_prompt(tokenizer, system=system)
        self.prefill = IncrementalPrefill(decoder, chunking, capacity=max(capacity, len(self.prompt) + 1),
                                          offload=offload)
        hidden = decoder.embed_tokens.weight
        none = torch.zeros((0, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
        self.prefill.extend(self.prompt, embed_prompt(decoder, self.prompt, none))

    @property
    def store(self):
        return self.prefill.store

    @property
    def groups(self) -> int:
        return len(self.prompt.group_starts)

    def add_all(self, visual: torch.Tensor, group_times: list[float], show_progress=False, cancel=None) -> dict:
        """The whole video at once (the prefix holds no group yet), by the mode's one-shot prefill over the text
        and every group (IncrementalPrefill.fill). Returns the prefill's stats."""
        assert not self.prompt.group_starts
        return self._grow(visual, group_times, lambda p, start: self.prefill.fill(
            p, embed_prompt(self.decoder, p, visual, p.video_end), show_progress, cancel))

    def add(self, visual: torch.Tensor, group_times: list[float]) -> None:
        """Append groups (`visual` [groups, tokens_per_group, hidden], each group's first frame's time) and
        prefill them against what is stored."""
        self._grow(visual, group_times, lambda p, start: self.prefill.extend(
            p, embed_prompt(self.decoder, p, visual, p.video_end, start)))

    def _grow(self, visual: torch.Tensor, group_times: list[float], run):
        """Add the groups to the prompt, then `run(prompt, its first new token)` and return what it returns; on
        failure the prompt is put back as it was."""
        if visual.shape[0] != len(group_times):
            raise ValueError(f"{visual.shape[0]} groups of visual tokens for {len(group_times)} group times")
        p = self.prompt
        start, before = p.video_end, (len(p.visual_positions), len(p.group_starts))
        try:
            for t in group_times:
                add_group(p, self.tokenizer, t, self.tokens_per_group, self.placeholder)
            return run(p, start)
        except BaseException:
            del p.input_ids[start:], p.visual_positions[before[0]:], p.group_starts[before[1]:]
            p.video_end = start
            raise
