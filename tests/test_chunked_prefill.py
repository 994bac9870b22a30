"""Chunk-based prefill: the block pattern, and every path (mask, streaming, offload, streamed vision tower)
against each other and against dense prefill. Tiny fp32 checkpoint; tolerance 1e-5 (float32 rounding of
different summation orders over a few hundred tokens stays around 1e-6)."""
import pytest
import torch

import videoxl
from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.prefill.modes import dense_prefill, mask_prefill, streaming_prefill
from videoxl.language.prompt import build_prompt
from videoxl.video.sources import load_video

TOL = 1e-5


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    from videoxl.checkpoint.tiny import make_demo_video

    # 22 s at 1 fps -> 22 frames -> 6 groups (last padded): enough blocks for windows to matter
    return make_demo_video(str(tmp_path_factory.mktemp("v") / "long.mp4"), seconds=22.0, fps=10,
                           size=(48, 32))


@pytest.fixture(scope="module")
def prepared(tiny, long_clip):
    model, tokenizer = tiny
    clip = load_video(long_clip, 64, 1, None)
    with torch.inference_mode():
        visual = model.encode_clip(clip)
    ts = list(clip.timestamps) + [clip.timestamps[-1]] * (-len(clip) % 4)
    prompt = build_prompt(tokenizer, "What is moving?", ts, model.config.tokens_per_group,
                          tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
    return model, prompt, model.embed_prompt(prompt, visual, prompt.video_end)


def reference_mask(prompt, groups_per_block, prev_blocks):
    """The reference's construction, re-derived loop by loop from its description (blocks found by the
    timestamp tokens, previous blocks opened, columns before the video open, timestamp rows/cols open)."""
    n, starts = prompt.video_end, prompt.group_starts
    mask = torch.zeros(n, n, dtype=torch.bool)
    block_starts, start = [], starts[0]
    for i in range(-(-len(starts) // groups_per_block)):
        nxt = (i + 1) * groups_per_block
        end = n if nxt >= len(starts) else starts[nxt]
        mask[start:end, start:end] = True
        if prev_blocks == 0:  # (the reference opens every previous block here: its bug, not copied)
            prev_start = start
        elif len(block_starts) >= prev_blocks:
            prev_start = block_starts[-prev_blocks]
        else:
            prev_start = starts[0]
        mask[start:end, prev_start:start] = True
        block_starts.append(start)
        start = end
    mask[:, :starts[0]] = True
    visual = set(prompt.visual_positions)
    for idx in range(starts[0], n):
        if idx not in visual:
            mask[idx, :] = True
            mask[:, idx] = True
    return mask & torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize("chunk, step", [(4, 1), (2, 1), (2, 2), (4, 2), (1, 1), (6, 3)])
def test_plan_matches_reference_pattern(prepared, chunk, step):
    _, prompt, _ = prepared
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=chunk, step_size=step))
    expected = reference_mask(prompt, step, chunk // step - 1)
    assert torch.equal(plan.dense_mask(), expected)
    full = prompt.video_end * (prompt.video_end + 1) // 2
    assert plan.attended_share() == pytest.approx(expected.sum().item() / full, abs=1e-12)
    if chunk < 6:
        assert plan.attended_share() < 0.9  # the pattern does leave work out


def run(fn, model, embeds, plan=None, offload=False):
    store = model.decoder.new_cache(capacity=embeds.shape[1] + 16, offload=offload)
    with torch.inference_mode():
        fn(model.decoder, embeds, store) if plan is None else fn(model.decoder, embeds, store, plan)
    return store


def assert_same_kvs(a, b, tol=TOL):
    """max |a - b| <= tol * max |b| per layer: relative, since the tiny random model's keys reach ~1e2 and
    CPU matmul kernels may round differently with the buffers' alignment."""
    assert a.length == b.length
    for layer in range(a.num_layers):
        for x, y in zip(a.layer(layer), b.layer(layer)):
            d = (x - y).abs()
            bad = torch.nonzero(d > tol * y.abs().max())
            assert not len(bad), (layer, d.max().item(), bad[:, 2].unique().tolist()[:30], len(bad))


@pytest.mark.parametrize("chunk, step", [(4, 1), (2, 2), (3, 3), (4, 2)])
def test_streaming_equals_mask(prepared, chunk, step):
    model, prompt, embeds = prepared
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=chunk, step_size=step))
    masked = run(mask_prefill, model, embeds, plan)
    streamed = run(streaming_prefill, model, embeds, plan)
    offloaded = run(streaming_prefill, model, embeds, plan, offload=True)
    assert_same_kvs(masked, streamed)
    assert_same_kvs(streamed, offloaded, tol=0.0)  # offload moves bytes, it computes nothing differently
    # and the pattern matters: dense prefill gives other KVs
    dense = run(dense_prefill, model, embeds)
    diff = max((x - y).abs().max().item() for x, y in zip(dense.layer(1), masked.layer(1)))
    assert diff > 100 * TOL


def test_streaming_slices_cut_through_blocks(prepared, monkeypatch):
    """Token slices that end inside a block (as they do on long videos) change nothing."""
    import videoxl.prefill.modes as prefill

    model, prompt, embeds = prepared
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=4, step_size=2))
    whole = run(streaming_prefill, model, embeds, plan)
    monkeypatch.setattr(prefill, "STREAM_TOKENS_PER_SLICE", 97)
    sliced = run(streaming_prefill, model, embeds, plan)
    assert_same_kvs(whole, sliced)


def test_window_covering_the_video_equals_dense(prepared):
    model, prompt, embeds = prepared
    groups = len(prompt.group_starts)
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=groups, step_size=1))
    assert plan.attended_share() == 1.0
    dense = run(dense_prefill, model, embeds)
    assert_same_kvs(dense, run(mask_prefill, model, embeds, plan))
    assert_same_kvs(dense, run(streaming_prefill, model, embeds, plan))


@pytest.mark.parametrize("mode", ["mask", "streaming"])
def test_chat_with_chunk_prefill(tiny, long_clip, mode):
    """Through the card's switches: same logits and same greedy answer in both modes, with and without
    offload and with a streamed vision tower."""
    model, tokenizer = tiny
    gen = {"max_new_tokens": 8}
    answers = {}
    try:
        model.config.enable_chunk_prefill = True
        for offload, vt in ((False, 4), (True, 24)):
            model.config.prefill_config = {"chunk_prefill_mode": mode, "chunk_size": 4, "step_size": 2,
                                           "offload": offload, "chunk_size_for_vision_tower": vt}
            answers[offload] = model.chat(long_clip, tokenizer, "What is moving?", max_num_frames=64,
                                          generation_config=gen)
            stats = model.last_stats
            assert stats["prefill"] == mode and stats["blocks"] == 3 and 0 < stats["attended_share"] < 1
        model.config.prefill_config["chunk_prefill_mode"] = "streaming" if mode == "mask" else "mask"
        other = model.chat(long_clip, tokenizer, "What is moving?", max_num_frames=64, generation_config=gen)
    finally:
        model.config.enable_chunk_prefill = False
        model.config.prefill_config = None
    assert answers[False] == answers[True] == other


def test_vision_tower_streamed_equals_whole(tiny, long_clip):
    model, _ = tiny
    clip = load_video(long_clip, 64, 1, None)
    with torch.inference_mode():
        whole = model.encode_clip(clip, 96)
        for per_slice in (4, 8, 12):
            # same math per frame; only BLAS blocking over a different batch size can move the last bits, and
            # DTS's softmax and GroupNorm amplify them (seen: 2.1e-5 with torch 2.13 on a 2-core CPU)
            torch.testing.assert_close(model.encode_clip(clip, per_slice), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config, message", [
    ({"chunk_prefill_mode": "fast"}, "chunk_prefill_mode must be one of ['streaming', 'mask']"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
    ({"step_size": 1.5}, "step_size must be a positive integer, got 1.5"),
    ({"chunk_size": 4, "step_size": 3}, "step_size (3) must divide chunk_size (4)"),
    ({"chunk_size_for_vision_tower": 10}, "chunk_size_for_vision_tower must be a multiple of 4"),
    ({"offload": "yes"}, "offload must be true or false"),
    ({"chunk_sise": 4}, "unknown prefill_config key(s) ['chunk_sise']"),
])
def test_bad_prefill_config(tiny, long_clip, config, message):
    model, tokenizer = tiny
    model.config.enable_chunk_prefill = True
    model.config.prefill_config = config
    try:
        with pytest.raises(videoxl.VideoXLError) as e:
            model.chat(long_clip, tokenizer, "q")
        assert message in str(e.value)
    finally:
        model.config.enable_chunk_prefill = False
        model.config.prefill_config = None


@pytest.mark.parametrize("tile", [16, 64, 128])
@pytest.mark.parametrize("reorder", [False, True])
def test_tile_classes_bound_the_mask(prepared, tile, reorder):
    """What the block-sparse kernel skips is truly masked, and what it runs unmasked is truly visible, in
    sequence order and in the attention order (open tokens first)."""
    _, prompt, _ = prepared
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=4, step_size=1))
    order = plan.attention_order() if reorder else torch.arange(plan.length)
    assert sorted(order.tolist()) == list(range(plan.length))
    dense = plan.dense_mask()[order][:, order]
    pad = -plan.length % tile
    t = dense.shape[0] // tile + bool(pad)
    tiles = torch.nn.functional.pad(dense, (0, pad, 0, pad)).view(t, tile, t, tile).transpose(1, 2)
    valid = torch.nn.functional.pad(torch.ones_like(dense), (0, pad, 0, pad)).view(t, tile, t, tile)
    valid = valid.transpose(1, 2)
    partial, full = plan.tile_classes(tile, order=order)
    any_allowed = tiles.flatten(2).any(-1)
    all_allowed = (tiles | ~valid).flatten(2).all(-1)
    assert not (full & ~all_allowed).any()
    assert not (~partial & ~full & any_allowed).any()
    skipped = (~partial & ~full).sum() / partial.numel()
    if tile == 16 and reorder:  # in attention order the bounds skip most of the (mostly masked) work
        assert skipped > 0.5


def test_block_sparse_attention_matches_dense_mask(prepared):
    """BlockSparseAttention through FlexAttention (eager, on the CPU) = SDPA with the dense boolean mask."""
    from videoxl.prefill.modes import BlockSparseAttention

    _, prompt, _ = prepared
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=4, step_size=1))
    torch.manual_seed(0)
    q = torch.randn(1, 4, plan.length, 16)
    k, v = torch.randn(1, 2, plan.length, 16), torch.randn(1, 2, plan.length, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plan.dense_mask(), enable_gqa=True)
    for tile in (32, 128):
        got = BlockSparseAttention(plan, torch.device("cpu"), tile)(q, k, v)
        assert (got - ref).abs().max() < TOL


def test_same_logits_after_mask_and_streaming_prefill(tiny, prepared, long_clip):
    """The question's logits on top of each prefilled store: mask vs streaming vs streaming with offload."""
    model, prompt, embeds = prepared
    _, tokenizer = tiny
    full = build_prompt(tokenizer, "What is moving?", prompt.timestamps, model.config.tokens_per_group,
                        tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
    tail = torch.tensor(full.input_ids[full.video_end:])
    plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=4, step_size=1))
    logits = {}
    for name, fn, offload in (("mask", mask_prefill, False), ("streaming", streaming_prefill, False),
                              ("offload", streaming_prefill, True)):
        store = run(fn, model, embeds, plan, offload=offload)
        with torch.inference_mode():
            logits[name] = model.decoder(model.decoder.embed_tokens(tail)[None], store, logits_for="all")
    assert logits["mask"].abs().max() > 0.1  # not vanishing: an absolute tolerance is meaningful
    assert (logits["mask"] - logits["streaming"]).abs().max() < TOL
    assert torch.equal(logits["streaming"], logits["offload"])
