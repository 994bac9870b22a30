"""Bi-level KV decoding on the tiny fp32 checkpoint (CPU): a full budget is chunked decoding exactly; pooling and
re-rotation against a direct re-computation; the question's own attention picks a planted block; settings."""
import numpy as np
import pytest
import torch

import videoxl
from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.language.decoder import apply_rope, rope_cos_sin
from videoxl.decoding.bilevel import SparseLevel, bilevel_question, mixed_store
from videoxl.decoding.sparse_config import SparseConfig
from videoxl.prefill.modes import streaming_prefill
from videoxl.language.prompt import build_prompt
from videoxl.video.sources import load_video

CHUNKING = PrefillConfig(chunk_size=4, step_size=2)


@pytest.fixture(scope="module")
def video(tiny, tmp_path_factory):
    """A 40-frame clip prefilled in streaming mode (10 groups, 5 blocks) and a question's tail tokens."""
    from videoxl.checkpoint.tiny import make_demo_video

    model, tokenizer = tiny
    path = make_demo_video(str(tmp_path_factory.mktemp("bl") / "v.mp4"), seconds=40.0, fps=2, size=(48, 32))
    clip = load_video(path, 40, 1, None)
    with torch.inference_mode():
        visual = model.encode_clip(clip)
        prompt = build_prompt(tokenizer, "What colour is the star?", clip.timestamps, model.config.tokens_per_group,
                              tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
        embeds = model.embed_prompt(prompt, visual, prompt.video_end)
        store = model.decoder.new_cache(capacity=len(prompt) + 64)
        store.plan = BlockPlan.from_prompt(prompt, CHUNKING)
        streaming_prefill(model.decoder, embeds, store, store.plan)
    tail = torch.tensor(prompt.input_ids[prompt.video_end:])
    return path, prompt, store, tail


def question(model, store, tail, prompt, **settings):
    with torch.inference_mode():
        return bilevel_question(model.decoder, store, tail, SparseConfig.from_dict(settings), prompt.timestamps,
                                CHUNKING.groups_per_block, 8)


def test_full_budget_is_chunked_decoding(tiny, video):
    model, _ = tiny
    _, prompt, store, tail = video
    with torch.inference_mode():
        ref = model.decoder(model.decoder.embed_tokens(tail)[None], store)
    store.truncate(prompt.video_end)
    mixed, logits, stats = question(model, store, tail, prompt, budget=1.0)
    # reference: the question over the chunk-prefilled store itself; fp32, positions unchanged (rotation by 0)
    assert ref.abs().max() > 0.1 and (logits - ref).abs().max() < 1e-5
    assert stats["kept_share"] == 1.0 and len(stats["dense_blocks"]) == stats["blocks"] == 5


def test_full_budget_same_greedy_text(tiny, video):
    model, tokenizer = tiny
    path = video[0]
    gen = {"max_new_tokens": 16}
    model.config.enable_chunk_prefill = True
    model.config.prefill_config = {"chunk_prefill_mode": "streaming", "chunk_size": 4, "step_size": 2}
    try:
        chunked = model.chat(path, tokenizer, "What moves?", max_num_frames=40, generation_config=gen)
        model.config.enable_sparse, model.config.sparse_config = True, {"budget": 1.0}
        sparse = model.chat(path, tokenizer, "What moves?", max_num_frames=40, generation_config=gen)
        assert model.last_stats["kept_share"] == 1.0
        model.config.sparse_config = {"budget": 2}
        model.chat(path, tokenizer, "What moves?", max_num_frames=40, generation_config=gen)
        assert len(model.last_stats["dense_blocks"]) == 2 and model.last_stats["kept_share"] < 0.8
    finally:
        model.config.enable_chunk_prefill = model.config.enable_sparse = False
        model.config.prefill_config = model.config.sparse_config = None
    assert sparse == chunked


def test_pooled_keys_equal_direct_recomputation(tiny, video):
    """Sparse blocks: each group's timestamp tokens kept, visual keys un-rotated, averaged over windows of
    `compression`, rotated to the compact position; checked for block 2 of layer 1 against a loop (fp32, 1e-5)."""
    model, _ = tiny
    _, prompt, store, _ = video
    cfg, plan = model.decoder.cfg, store.plan
    with torch.inference_mode():
        level = SparseLevel(model.decoder, store, plan, 4)
        mixed, owner = mixed_store(model.decoder, store, level, {0, 4}, 0)
        k_all, _ = store.layer(1)
        got = mixed.layer(1)[0][0][:, (owner == 2).nonzero().flatten()]
        s, e = plan.blocks[2]
        raw = []
        t = s
        while t < e:
            if plan.timestamp[t]:
                group = [t]
            else:
                group = [t + i for i in range(4) if t + i < e and not plan.timestamp[t + i]]
            cos, sin = rope_cos_sin(-torch.tensor(group), cfg.head_dim, cfg.rope_theta, torch.float32)
            raw.append(apply_rope(k_all[0][:, group], cos, sin).mean(1))
            t = group[-1] + 1
        first = int((owner == 2).nonzero()[0])
        cos, sin = rope_cos_sin(torch.arange(first, first + len(raw)), cfg.head_dim, cfg.rope_theta, torch.float32)
        ref = apply_rope(torch.stack(raw, 1), cos, sin)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5
    assert mixed.length == plan.blocks[0][1] + sum(  # the dense blocks whole, the sparse ones pooled
        hi - lo for b, (lo, hi) in enumerate(level.block_slots) if b in (1, 2, 3)) + plan.blocks[4][1] - plan.blocks[4][0]


def test_compression_one_keeps_every_key(tiny, video):
    """compression=1 pools nothing: sparse blocks hold every key, moved away from and back to its own position,
    so the question's logits match dense decoding to rotation rounding (fp32, 1e-4)."""
    model, _ = tiny
    _, prompt, store, tail = video
    with torch.inference_mode():
        ref = model.decoder(model.decoder.embed_tokens(tail)[None], store)
    store.truncate(prompt.video_end)
    _, logits, stats = question(model, store, tail, prompt, budget=2, compression=1)
    assert len(stats["dense_blocks"]) == 2 and (logits - ref).abs().max() < 1e-4


def test_planted_block_is_chosen(tiny, video):
    """Block 2's keys, at the scoring layers, replaced by the question's own (un-rotated) mean query, scaled: the
    question's attention must then pick block 2 as the one non-forced dense block."""
    model, _ = tiny
    _, prompt, store, tail = video
    cfg, plan = model.decoder.cfg, store.plan
    queries = {}
    layers = model.decoder.layers
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda m, i, o, n=n: queries.__setitem__(n, o[0])) for n, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            model.decoder(model.decoder.embed_tokens(tail)[None], store, logits_for="none")
    finally:
        for h in hooks:
            h.remove()
    store.truncate(prompt.video_end)
    planted = model.decoder.new_cache(capacity=plan.length + 64)
    planted.plan = plan
    s, e = plan.blocks[2]
    positions = torch.arange(s, e)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    with torch.inference_mode():
        for n in range(cfg.num_hidden_layers):
            k, v = (t.clone() for t in store.layer(n))
            if n >= cfg.num_hidden_layers // 2:  # q_proj output is before RoPE: the raw query
                q = queries[n].view(-1, cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads,
                                    cfg.head_dim).mean(dim=(0, 2))  # [kv_heads, head_dim]
                k[0, :, s:e] = apply_rope(8 * q[:, None, :].expand(-1, e - s, -1), cos, sin)
            slot_k, slot_v = planted.layer_slot(n, plan.length)
            slot_k.copy_(k)
            slot_v.copy_(v)
            planted.commit(n, plan.length)
    _, _, stats = question(model, planted, tail, prompt, budget=3)
    times = [list(t) for t in stats["dense_blocks"]]
    scores = stats["block_scores"]
    assert max(range(5), key=lambda b: scores[b] if b in (1, 2, 3) else -1) == 2, scores
    assert len(times) == 3 and times[1][0] == prompt.timestamps[16]  # block 2 starts at frame 16


def test_dense_times_force_blocks(tiny, video):
    model, _ = tiny
    _, prompt, store, tail = video
    _, _, stats = question(model, store, tail, prompt, budget=1, dense_times=[[prompt.timestamps[25]] * 2])
    # the first and last blocks are always dense, and the block holding frame 25 (block 3) is forced
    assert [t[0] for t in stats["dense_blocks"]] == [prompt.timestamps[i] for i in (0, 24, 32)]


def test_random_selection_draws_the_rest_of_the_budget(tiny, video):
    """select='random' (a baseline for the quality bench): first, last and forced blocks, then seeded draws."""
    model, _ = tiny
    _, prompt, store, tail = video
    chosen = set()
    for seed in range(8):
        _, _, stats = question(model, store, tail, prompt, budget=3, select="random", seed=seed)
        firsts = [t[0] for t in stats["dense_blocks"]]
        assert len(firsts) == 3 and firsts[0] == prompt.timestamps[0] and firsts[-1] == prompt.timestamps[32]
        assert "block_scores" not in stats  # no relevance pass
        chosen.add(firsts[1])
        again = question(model, store, tail, prompt, budget=3, select="random", seed=seed)[2]["dense_blocks"]
        assert again == stats["dense_blocks"]  # the seed decides
    assert len(chosen) == 3  # blocks 1, 2 and 3 all drawn over the seeds


@pytest.mark.parametrize("settings, message", [
    ({"budget": 0}, "budget as a number of blocks must be >= 1"),
    ({"budget": 1.5}, r"budget as a share must be in \(0, 1\]"),
    ({"budget": "half"}, "budget must be a share"),
    ({"budget": True}, "budget must be a share"),
    ({"compression": 0}, "compression must be an integer >= 1"),
    ({"compression": 2.5}, "compression must be an integer >= 1"),
    ({"dense_times": [[5, 2]]}, "each dense_times entry"),
    ({"dense_times": "0-10"}, "dense_times must be a list"),
    ({"budget_share": 0.2}, "unknown sparse_config key"),
    ({"select": "oracle"}, "select must be 'model' or 'random'"),
    ({"select": "random", "seed": 1.5}, "seed must be an integer"),
])
def test_bad_sparse_config(tiny, clip_path, settings, message):
    model, tokenizer = tiny
    model.config.enable_chunk_prefill, model.config.enable_sparse = True, True
    model.config.sparse_config = settings
    try:
        with pytest.raises(videoxl.VideoXLError, match=message):
            model.chat(clip_path, tokenizer, "q")
    finally:
        model.config.enable_chunk_prefill = model.config.enable_sparse = False
        model.config.sparse_config = None


def test_budget_counts():
    assert SparseConfig.from_dict({"budget": 0.25}).dense_count(10) == 3
    assert SparseConfig.from_dict({"budget": 1.0}).dense_count(7) == 7
    assert SparseConfig.from_dict({"budget": np.int64(4)}).dense_count(10) == 4
    assert SparseConfig.from_dict({"budget": 40}).dense_count(10) == 10


def test_cli_sparse(tiny_dir, video, capsys):
    from videoxl.cli.main import main

    path = video[0]
    args = ["chat", path, "What moves?", "--model", tiny_dir, "--max-new-tokens", "4", "--no-progress",
            "--max-num-frames", "40"]
    assert main(args + ["--sparse"]) == 2
    assert "--sparse (bi-level decoding) needs --chunk-prefill" in capsys.readouterr().err
    assert main(args + ["--sparse", "--chunk-prefill", "streaming", "--sparse-budget", "1.5"]) == 2
    assert "budget as a share must be in (0, 1]" in capsys.readouterr().err
    assert main(args + ["--chunk-prefill", "streaming", "--chunk-size", "4", "--step-size", "2", "--sparse",
                        "--sparse-budget", "2", "--dense-times", "9-10"]) == 0
    err = capsys.readouterr().err
    # blocks of 8 frames at 1 fps: the first (0-7 s), the one holding 9-10 s, and the last (32-39 s)
    assert "bi-level: 3 of 5 blocks dense (0-7s, 8-15s, 32-39s)" in err
