"""Incremental prefill (prefill/incremental.py): the KVs after extending the store piece by piece, in any split
of the tokens (whole groups, or cuts anywhere, even inside a group or a block), equal the one-shot prefill's KVs
in every mode, with and without offload; and the question's logits over them agree (same greedy answer).
Tiny fp32 checkpoint; same tolerance and comparison as test_chunked_prefill."""
import random

import pytest
import torch

from tests.test_chunked_prefill import assert_same_kvs, long_clip, prepared, run  # noqa: F401 (fixtures)
from videoxl.errors import VideoXLError
from videoxl.language.prompt import VideoPrompt
from videoxl.prefill.incremental import IncrementalPrefill
from videoxl.prefill.modes import dense_prefill, mask_prefill, streaming_prefill
from videoxl.prefill.plan import BlockPlan, PrefillConfig


def cut(prompt: VideoPrompt, end: int) -> VideoPrompt:
    """The prompt as it stood when only its first `end` tokens had arrived (no question yet)."""
    return VideoPrompt(prompt.input_ids[:end], [p for p in prompt.visual_positions if p < end],
                       [g for g in prompt.group_starts if g < end], end, prompt.timestamps)


def splits(prompt: VideoPrompt, seed: int) -> list[int]:
    """Cut points: seed 0 = text before the video, then one group at a time (what live video does);
    other seeds: random cuts anywhere (inside groups, inside blocks, single tokens)."""
    n = prompt.video_end
    if seed == 0:
        return prompt.group_starts + [n]
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, n), rng.randint(3, 12)) + [n - 1])
    return sorted(set(points)) + [n]


def incremental(model, prompt, embeds, chunking, cuts, offload=None):
    inc = IncrementalPrefill(model.decoder, chunking, capacity=64, offload=offload)
    start = 0
    with torch.inference_mode():
        for end in cuts:
            assert inc.extend(cut(prompt, end), embeds[:, start:end]) == end
            start = end
    return inc


ONE_SHOT = {"dense": dense_prefill, "mask": mask_prefill, "streaming": streaming_prefill}


@pytest.mark.parametrize("mode, chunk, step", [("dense", 0, 0), ("mask", 4, 1), ("mask", 4, 2),
                                               ("streaming", 4, 2), ("streaming", 6, 3)])
@pytest.mark.parametrize("offload", [False, True])
def test_any_split_equals_one_shot(prepared, mode, chunk, step, offload):  # noqa: F811
    model, prompt, embeds = prepared
    chunking = None if mode == "dense" else PrefillConfig(mode, chunk, step, offload)
    plan = None if chunking is None else BlockPlan.from_prompt(prompt, chunking)
    whole = run(ONE_SHOT[mode], model, embeds, plan, offload=offload)
    for seed in (0, 1, 2):
        inc = incremental(model, prompt, embeds, chunking, splits(prompt, seed), offload)
        assert inc.store.offload == offload and inc.length == prompt.video_end
        assert_same_kvs(inc.store, whole)
        if plan is not None:
            assert torch.equal(inc.store.plan.dense_mask(), plan.dense_mask())


@pytest.mark.parametrize("mode", ["dense", "streaming"])
def test_question_between_pieces_changes_nothing(prepared, mode):  # noqa: F811
    """A question asked mid-way appends its tokens to the store; the next piece drops them, and the answer's
    logits over the grown store equal those over the one-shot store (so greedy decoding picks the same)."""
    model, prompt, embeds = prepared
    chunking = None if mode == "dense" else PrefillConfig(mode, 4, 2)
    tail = torch.tensor(prompt.input_ids[prompt.video_end:])
    starts = prompt.group_starts
    inc = IncrementalPrefill(model.decoder, chunking, capacity=64)
    with torch.inference_mode():
        inc.extend(cut(prompt, starts[2]), embeds[:, :starts[2]])
        model.decoder(model.decoder.embed_tokens(tail)[None], inc.store)  # the question, mid-way
        assert inc.store.length > inc.length
        inc.extend(cut(prompt, prompt.video_end), embeds[:, starts[2]:])
        whole = run(ONE_SHOT[mode], model, embeds, None if chunking is None
                    else BlockPlan.from_prompt(prompt, chunking))
        assert_same_kvs(inc.store, whole)
        a = model.decoder(model.decoder.embed_tokens(tail)[None], inc.store, logits_for="all")
        b = model.decoder(model.decoder.embed_tokens(tail)[None], whole, logits_for="all")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_pieces_must_meet_the_prompt(prepared):  # noqa: F811
    model, prompt, embeds = prepared
    inc = IncrementalPrefill(model.decoder, None, capacity=64)
    with pytest.raises(VideoXLError, match="do not reach the prompt's end"):
        inc.extend(cut(prompt, 40), embeds[:, :30])


@pytest.mark.parametrize("mode, offload, overlap, split", [
    ("dense", False, True, None), ("mask", False, True, None), ("streaming", False, True, None),
    ("streaming", True, True, None), ("mask", False, False, None), ("streaming", True, False, None),
    ("dense", False, True, 0.5), ("mask", False, True, 0.5), ("streaming", True, True, 0.5)])
def test_file_prefilled_while_decoding_equals_one_shot(tiny, prepared, long_clip, monkeypatch, mode, offload,  # noqa: F811
                                                       overlap, split):
    """pipeline.build_prefix prefills each vision slice of a file as it is encoded (4 frames a slice here, so
    6 slices); whether slices went in one by one or batched, the KVs equal the one-shot prefill's (tolerance and
    reference as above: test_chunked_prefill.assert_same_kvs, relative 1e-5, fp32). `overlap=False` is what CUDA
    does for chunked modes (GrowingPrefix.add_all after the last slice). `split` (growing.PREFILL_SPLIT, with which
    `prefill_as_encoded` says yes on every device): two extensions, the first once half the frames are encoded,
    the rest after the last."""
    from videoxl import pipeline
    from videoxl.prefill import growing

    model, prompt, embeds = prepared
    monkeypatch.setattr(pipeline, "DEFAULT_FRAMES_PER_SLICE", 4)
    monkeypatch.setattr(pipeline, "prefill_as_encoded", lambda device, chunking: overlap)
    monkeypatch.setattr(growing, "PREFILL_SPLIT", split)
    added = []
    add = growing.GrowingPrefix.add
    monkeypatch.setattr(growing.GrowingPrefix, "add", lambda self, visual, t: (added.append(len(t)),
                                                                                add(self, visual, t)))
    chunking = None if mode == "dense" else PrefillConfig(mode, 4, 2, offload, chunk_size_for_vision_tower=4)
    plan = None if chunking is None else BlockPlan.from_prompt(prompt, chunking)
    whole = run(ONE_SHOT[mode], model, embeds, plan, offload=offload)
    tokenizer = tiny[1]
    with torch.inference_mode():
        entry = pipeline.build_prefix(model, long_clip, tokenizer, "What is moving?", [], (64, 1, None), chunking,
                                      False, None)
    assert entry.prompt.input_ids == prompt.input_ids[:prompt.video_end]
    assert entry.prompt.timestamps == prompt.timestamps and entry.cache.offload == offload
    assert entry.stats["frames"] == 22 and entry.stats["groups"] == 6
    assert entry.stats["prefill_overlapped"] == (overlap or split is not None)
    if split is not None:  # groups of the first extension (slices are handed out while others wait: >= half)
        assert len(added) == 2 and added[0] >= 3 and sum(added) == 6
    entry.cache.truncate(prompt.video_end)
    assert_same_kvs(entry.cache, whole)
    if plan is not None:
        assert entry.cache.plan.blocks == plan.blocks



@pytest.mark.parametrize("mode, chunk, step", [("mask", 4, 1), ("streaming", 4, 2), ("streaming", 6, 3)])
def test_flex_extensions_equal_one_shot(prepared, monkeypatch, mode, chunk, step):  # noqa: F811
    """Extensions as one FlexAttention call over the new rows (BlockSparseAttention(rows=...), its rectangular
    BlockMask; FlexAttention runs eagerly on the CPU) give the one-shot KVs, in any split (same tolerance)."""
    from videoxl.prefill import incremental as inc_module

    model, prompt, embeds = prepared
    monkeypatch.setattr(inc_module, "flex_extensions", lambda device: True)
    chunking = PrefillConfig(mode, chunk, step, False)
    whole = run(ONE_SHOT[mode], model, embeds, BlockPlan.from_prompt(prompt, chunking))
    for seed in (0, 1, 2):
        assert_same_kvs(incremental(model, prompt, embeds, chunking, splits(prompt, seed)).store, whole)


def test_rectangular_tile_classes_bound_the_mask(prepared):  # noqa: F811
    """For an extension's rows against every key: what the kernel skips is masked, what it runs unmasked is
    visible (as test_chunked_prefill checks for the square)."""
    _, prompt, _ = prepared
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=4, step_size=1))
    order = plan.attention_order()
    tile = 16
    for start, stop in ((0, plan.length), (plan.video_start + 5, plan.length), (40, 200)):
        idx = torch.arange(start, stop)
        rows = torch.cat([idx[plan.timestamp[start:stop]], idx[~plan.timestamp[start:stop]]])
        dense = plan.dense_mask()[rows][:, order]
        pq, pk = -len(rows) % tile, -plan.length % tile
        padded = torch.nn.functional.pad(dense, (0, pk, 0, pq))
        valid = torch.nn.functional.pad(torch.ones_like(dense), (0, pk, 0, pq))
        shape = (padded.shape[0] // tile, tile, padded.shape[1] // tile, tile)
        tiles, valid = padded.view(shape).transpose(1, 2), valid.view(shape).transpose(1, 2)
        partial, full = plan.tile_classes(tile, order=order, rows=rows)
        assert not (full & ~(tiles | ~valid).flatten(2).all(-1)).any()
        assert not (~partial & ~full & tiles.flatten(2).any(-1)).any()
