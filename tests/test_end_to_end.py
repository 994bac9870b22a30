"""make-tiny -> load -> chat on a synthetic video, through the same paths users take (API and CLI)."""
import pytest
import torch

import videoxl
from videoxl.cli.main import main
from videoxl.language.prompt import build_prompt

GREEDY = {"do_sample": False, "max_new_tokens": 12}


def reference_answer(model, tokenizer, video, question, history=None, max_new_tokens=12):
    """An independent greedy decode: one full causal forward per token over the whole prompt, no cache reuse."""
    from videoxl.video.sources import load_video

    clip = load_video(video, 150, 1, None)
    visual = model.encode_clip(clip)
    ts = list(clip.timestamps) + [clip.timestamps[-1]] * (-len(clip) % 4)
    prompt = build_prompt(tokenizer, question, ts, model.config.tokens_per_group,
                          tokenizer.convert_tokens_to_ids("<|vision_pad|>"), history)
    embeds = model.embed_prompt(prompt, visual)
    out = []
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for _ in range(max_new_tokens):
        logits = model.decoder(embeds, model.decoder.new_cache(), logits_for="last")
        tok = int(logits[0, -1].argmax())
        if tok == stop:
            break
        out.append(tok)
        embeds = torch.cat([embeds, model.decoder.embed_tokens(torch.tensor([[tok]]))], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_chat_returns_text_and_matches_uncached_reference(tiny, clip_path):
    model, tokenizer = tiny
    answer = model.chat(clip_path, tokenizer, "What happens?", max_num_frames=16, sample_fps=1,
                        generation_config=GREEDY)
    assert isinstance(answer, str) and answer
    assert model.last_stats["frames"] == 6 and model.last_stats["groups"] == 2
    with torch.inference_mode():
        assert answer == reference_answer(model, tokenizer, clip_path, "What happens?")


def test_multi_turn_history_and_prefix_reuse(tiny, clip_path):
    model, tokenizer = tiny
    a1, history = model.chat(clip_path, tokenizer, "What happens?", return_history=True,
                             max_num_frames=16, generation_config=GREEDY)
    assert history == [{"role": "user", "content": "What happens?"}, {"role": "assistant", "content": a1}]
    runs = model.kv_cache.counts["vision_runs"]
    a2, history2 = model.chat(clip_path, tokenizer, "And then?", chat_history=history, return_history=True,
                              max_num_frames=16, generation_config=GREEDY)
    assert model.kv_cache.counts["vision_runs"] == runs  # the video's KVs were reused, not recomputed
    assert model.last_stats["kv_cache"] == "memory" and model.last_stats["cached_tokens"] > 0
    assert len(history2) == 4 and history2[-1]["content"] == a2
    with torch.inference_mode():
        assert a2 == reference_answer(model, tokenizer, clip_path, "And then?", [("What happens?", a1)])
    # (question, answer) pairs are accepted as history too
    assert model.chat(clip_path, tokenizer, "And then?", chat_history=[("What happens?", a1)],
                      max_num_frames=16, generation_config=GREEDY) == a2


def test_sampling_is_seeded_and_streams(tiny, clip_path):
    model, tokenizer = tiny
    cfg = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": 50, "seed": 7, "max_new_tokens": 10,
           "repetition_penalty": 1.1}
    pieces = []
    a = model.chat(clip_path, tokenizer, "Describe.", max_num_frames=16, generation_config=cfg,
                   on_text=pieces.append)
    b = model.chat(clip_path, tokenizer, "Describe.", max_num_frames=16, generation_config=cfg)
    assert a == b == "".join(pieces)
    greedy = model.chat(clip_path, tokenizer, "Describe.", max_num_frames=16,
                        generation_config={"max_new_tokens": 10})
    assert len(pieces) > 1 and a != greedy  # random weights: a 1.5-temperature sample differs from greedy


def test_images_and_arrays(tiny):
    import numpy as np

    model, tokenizer = tiny
    frames = [np.full((40, 60, 3), i * 40, dtype=np.uint8) for i in range(5)]
    assert isinstance(model.chat(frames, tokenizer, "What?", generation_config=GREEDY), str)
    assert model.last_stats["frames"] == 5 and model.last_stats["groups"] == 2


@pytest.mark.parametrize("cfg, message", [
    ({"num_beams": 2}, "beam search"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"temperature": -1}, "temperature must be a number >= 0"),
    ({"bogus": 1}, "unknown generation_config key"),
])
def test_bad_generation_config(tiny, clip_path, cfg, message):
    model, tokenizer = tiny
    with pytest.raises(videoxl.VideoXLError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.chat(clip_path, tokenizer, "q", generation_config=cfg)


def test_sparse_needs_chunk_prefill(tiny, clip_path):
    model, tokenizer = tiny
    model.config.enable_sparse = True
    try:
        with pytest.raises(videoxl.VideoXLError, match="enable_sparse .* needs chunk prefill"):
            model.chat(clip_path, tokenizer, "q")
    finally:
        model.config.enable_sparse = False


def test_cli_demo_and_chat(tiny_dir, clip_path, capsys):
    assert main(["chat", clip_path, "What happens?", "--model", tiny_dir, "--max-new-tokens", "5",
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "frames" in err
    assert main(["chat", clip_path, "What happens?", "--model", tiny_dir, "--max-new-tokens", "5",
                 "--no-progress", "--chunk-prefill", "streaming", "--chunk-size", "2", "--offload"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "prefill streaming, 2 blocks" in err
    if torch.cuda.is_available():
        assert "KVs offloaded" in err
    else:  # on a CPU there is nowhere to offload to: say so, claim nothing
        assert "KVs offloaded" not in err and "note: --offload has no effect on a CPU" in err
    assert main(["inspect", tiny_dir]) == 0
    assert "status: OK" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["chat", "/no/such.mp4", "q", "--model", "TINY"], "error: video not found: /no/such.mp4"),
    (["chat", "CLIP", "q", "--model", "/no/such/dir"], "error: checkpoint folder not found: /no/such/dir"),
    (["chat", "CLIP", "q", "--model", "TINY", "--max-num-frames", "0"],
     "error: max_num_frames must be a positive integer, got 0"),
    (["chat", "CLIP", "q", "--model", "TINY", "--sample-fps", "-1"],
     "error: sample_fps must be a positive number or None, got -1.0"),
    (["chat", "CLIP", "q", "--model", "TINY", "--top-p", "2"], "error: generation_config: top_p must be in (0, 1]"),
    (["chat", "CLIP", "q", "--model", "TINY", "--dtype", "int8"], "error: dtype must be one of"),
    (["chat", "CLIP", "q", "--model", "TINY", "--device", "gpu0"], "error: device must be like 'cpu', 'cuda'"),
    (["chat", "CLIP", "q"], "error: give --model DIR"),
    (["chat", "CLIP", "q", "--model", "TINY", "--chunk-prefill", "mask", "--chunk-size", "3", "--step-size", "2"],
     "error: prefill_config: step_size (2) must divide chunk_size (3)"),
    (["chat", "CLIP", "q", "--model", "TINY", "--chunk-prefill", "streaming", "--vision-chunk", "6"],
     "error: prefill_config: chunk_size_for_vision_tower must be a multiple of 4"),
])
def test_cli_errors_are_one_line(tiny_dir, clip_path, capsys, args, message):
    args = [{"TINY": tiny_dir, "CLIP": clip_path}.get(a, a) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_cli_bad_videos(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("hello, this is not a video")
    for path, message in ((empty, "error: video file is empty"), (text, "error: not a readable video")):
        assert main(["chat", str(path), "q", "--model", tiny_dir, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err


def test_decode_errors_surface_from_the_decoding_thread(tiny):
    """Frames are decoded on a worker thread while the vision tower encodes: its errors reach the caller."""
    import numpy as np

    from videoxl.video.sources import FrameStream

    model, _ = tiny

    def read(size):
        yield [0, 1, 2, 3], np.zeros((4, 384, 384, 3), dtype=np.uint8)
        raise videoxl.VideoXLError("corrupt video, frame 4 unreadable")

    stream = FrameStream("x.mp4", list(range(8)), 30.0, 8, read)
    with pytest.raises(videoxl.VideoXLError, match="frame 4 unreadable"):
        model.encode_stream(stream, 4)


def test_truncated_video_answers_with_the_frames_it_has(tiny, clip_path, tmp_path):
    data = open(clip_path, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    model, tokenizer = tiny
    try:
        answer = model.chat(str(cut), tokenizer, "What?", generation_config=GREEDY)
    except videoxl.VideoXLError as e:  # a cut through the header is a one-line error, not a crash
        assert "video" in str(e)
    else:
        assert isinstance(answer, str) and 1 <= model.last_stats["frames"] <= 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_without_gpu(tiny_dir, clip_path, capsys):
    assert main(["chat", clip_path, "q", "--model", tiny_dir, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("error: device 'cuda' asked for, but this torch sees no CUDA GPU "
                                               "(use --device cpu)")
