"""The "shapes" task generator (to the letter of synthetic-task.md), the shipped demo model, and tiny training."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import videoxl
from videoxl.demo import shapes


@pytest.mark.parametrize("seconds", [12, 64, 256, 1024])
def test_scenes_follow_the_spec(seconds):
    for seed in range(20):
        v = shapes.make_video(seed, seconds)
        lengths = [s.end - s.start for s in v.scenes]
        assert sum(lengths) == seconds and v.scenes[0].start == 0
        assert all(4 <= n <= 12 for n in lengths)
        assert all(a.end == b.start for a, b in zip(v.scenes, v.scenes[1:]))
        stars = [i for i, s in enumerate(v.scenes) if s.shape == "star"]
        assert len(stars) == 1 and 0 < stars[0] < len(v.scenes) - 1
        assert all(a.colour != b.colour for a, b in zip(v.scenes, v.scenes[1:]))
        for s in v.scenes:
            assert 0.3 * v.height <= s.size <= 0.5 * v.height
            assert abs(s.vx) <= shapes.MAX_DRIFT and abs(s.vy) <= shapes.MAX_DRIFT
        a = v.answers
        assert a["needle"] == v.scenes[stars[0]].colour and a["after"] == v.scenes[stars[0] + 1].shape
        assert a["first"] == v.scenes[0].colour and a["last"] == v.scenes[-1].colour


@pytest.mark.parametrize("size", [(160, 120), (320, 240), (640, 480)])
def test_rendered_shapes_stay_inside_and_have_the_right_colour_and_height(size):
    v = shapes.make_video(7, 40, *size, noise=0.0)
    frames = shapes.render(v, torch.arange(0, 80)).numpy()
    assert frames.shape == (80, size[1], size[0], 3)
    bg = np.array(shapes.BACKGROUND)
    for f, idx in zip(frames, range(80)):
        scene = next(s for s in v.scenes if s.start * 2 <= idx < s.end * 2)
        fg = np.any(f != bg, axis=-1)
        assert not fg[0].any() and not fg[-1].any() and not fg[:, 0].any() and not fg[:, -1].any()
        colour = (f[fg] == np.array(shapes.COLOURS[scene.colour])).all(-1)
        assert (colour | ((f[fg] == 0).all(-1) & (scene.shape == "star"))).all()  # the star's digit is black
        rows = np.nonzero(fg.any(1))[0]
        height = rows[-1] - rows[0] + 1
        assert abs(height - scene.size) <= 3.0 and 0.3 * size[1] <= height <= 0.5 * size[1]


def test_noise_is_mild_and_seeded():
    v = shapes.make_video(3, 16, noise=8.0)
    a, b = shapes.frames_1fps(v), shapes.frames_1fps(v)
    assert torch.equal(a, b)
    corner = a[:, :4, :4].float()  # background there in these seeds
    assert abs(corner.mean().item() - 32) < 2 and corner.std().item() < 9


def test_answer_rule():
    assert shapes.is_correct("Red.", "red") and shapes.is_correct(" magenta, I think", "magenta")
    assert not shapes.is_correct("dark red", "red") and not shapes.is_correct("", "red")


def test_file_and_frame_list_give_the_same_timestamps(tmp_path):
    from videoxl.video.sources import load_video, open_video

    v = shapes.make_video(5, 16)
    clip = load_video(shapes.write_video(v, str(tmp_path / "v.mp4")), max_num_frames=16, sample_fps=1)
    frames = shapes.model_frames(v)
    stream = open_video(frames, max_num_frames=16, sample_fps=1)
    list(stream.batches(16))
    assert clip.timestamps == stream.timestamps == [float(t) for t in range(16)]
    # same picture up to the codec: mean absolute difference of a few 8-bit levels
    assert np.abs(clip.frames.astype(int) - np.stack(frames).astype(int)).mean() < 6


@pytest.fixture(scope="module")
def demo():
    return videoxl.load(videoxl.demo_model_path(), device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_shipped_model_finds_the_needle(demo):
    """Proof that the shipped weights load through `videoxl.load` and work: 9 of 10 fixed 64-s version 1 videos."""
    model, tok = demo
    right = 0
    for seed in range(10):
        v = shapes.make_video(900_000 + seed, 64, version=1)
        answer = model.chat(shapes.model_frames(v), tok, shapes.QUESTIONS["needle"], max_num_frames=64,
                            sample_fps=1, generation_config={"max_new_tokens": 4})
        right += shapes.is_correct(answer, v.answers["needle"])
    assert right >= 9, right


@pytest.fixture(scope="module")
def every_kind(demo):
    """The shipped model's answers to the seven questions of 6 fixed 64-s version 2 videos: kind -> [right?]."""
    from videoxl.cache.identity import VideoRef

    model, tok = demo
    right = {k: [] for k in shapes.KINDS}
    for seed in range(6):
        v = shapes.make_video(910_000 + seed, 64)
        source = VideoRef(f"every-kind-{seed}", tuple(shapes.model_frames(v)))  # one prefill, seven questions
        for kind, question in v.questions.items():
            answer = model.chat(source, tok, question, max_num_frames=64, sample_fps=1,
                                generation_config={"max_new_tokens": 4})
            right[kind].append(shapes.is_correct(answer, v.answers[kind]))
    return right


NOT_YET = pytest.mark.xfail(strict=False, reason="only partly learned by the shipped v2 weights (held-out, 64 s, dense: "
                            "time 35 %; bench/RESULTS.md, task version 2): below this test's 5 of 6")


@pytest.mark.parametrize("kind", [pytest.param(k, marks=NOT_YET) if k == "time" else k
                                  for k in shapes.KINDS])
def test_shipped_model_answers_every_kind(every_kind, kind):
    assert sum(every_kind[kind]) >= 5, every_kind[kind]


def test_cli_demo_quiz_writes_only_to_the_cache(tmp_path, monkeypatch, capsys):
    from videoxl.cli.main import main

    monkeypatch.setenv("VIDEOXL_CACHE", str(tmp_path / "cache"))
    assert main(["chat", "--demo", "--device", "cpu", "--seed", "11"]) == 0
    out, err = capsys.readouterr()
    assert "NOT Video-XL-2" in err
    assert out.count("expected:") == 7 and "/7 right" in out
    assert os.listdir(tmp_path / "cache" / "demo") == ["shapes-64s-seed11.mp4"]


@pytest.mark.parametrize("offset", [0, 400])
def test_training_forward_matches_the_inference_path(demo, offset):
    """The training forward (TrainCache, all seven questions at once) gives chat's first-token logits; with an
    offset, as for timestamps that start `offset` s into a stream and a time question shifted by as much."""
    from videoxl.language.prompt import build_prompt
    from videoxl.demo.train_tiny import Task, forward

    model, tok = demo
    v = shapes.make_video(1, 16)
    frames = np.stack(shapes.model_frames(v))
    task = Task(tok, model.config)
    assert f"Time {float(offset + 12)}s:" in tok.decode(task.prompts(16, offset)["needle"].input_ids)
    ids, _ = task.tails(16, [v], "cpu", offset)
    assert f"at {v.time_n + offset} seconds" in tok.decode(ids[shapes.KINDS.index("time")])
    with torch.no_grad():
        _, pred, _ = forward(model, task, 16, [v], torch.from_numpy(frames), offset=offset)
    with torch.no_grad():
        visual = model.vision(frames)
    for i, (kind, q) in enumerate(v.questions.items()):
        if kind == "time":
            q = shapes.TIME_QUESTION.format(n=v.time_n + offset)
            assert str(v.time_n + offset) in q
        ts = [float(t + offset) for t in range(16)]
        p = build_prompt(tok, q, ts, model.config.tokens_per_group, model._placeholder_id(tok))
        with torch.no_grad():
            cache = model.decoder.new_cache(len(p) + 8)
            logits = model.decoder(model.embed_prompt(p, visual), cache)
        assert logits[0, -1].argmax().item() == pred[i].item()


def test_a_chunk_mask_fits_the_shifted_prompt(demo):
    """`--time-offsets`: later timestamps take more tokens, so the chunked-prefill mask is built on the shifted prompt."""
    from videoxl.demo.train_tiny import Task, chunk_mask

    model, tok = demo
    task = Task(tok, model.config)
    mask = next(m for seed in range(50) if (m := chunk_mask(task, 16, np.random.default_rng(seed), "cpu", 400))
                is not None)
    assert mask.shape[-1] == task.prompts(16, 400)["needle"].video_end > task.prompts(16)["needle"].video_end


def test_time_offsets_are_multiples_of_4_that_keep_the_video_within_1024_s():
    from videoxl.demo.train_tiny import time_offset

    rng = np.random.default_rng(0)
    for seconds in (16, 256, 1020, 1024):
        offsets = {time_offset(rng, seconds) for _ in range(200)}
        assert all(o % 4 == 0 and 0 <= o <= 1024 - seconds for o in offsets)
    assert offsets == {0}  # 1,024 s: no room to shift
    assert len({time_offset(rng, 16) for _ in range(200)}) > 100


def test_training_is_deterministic_on_the_cpu(tmp_path):
    from videoxl.demo.train_tiny import load_blob, main

    for name in ("a", "b"):
        assert main(["--out", str(tmp_path / name), "--total-steps", "1", "--frames", "16", "--device", "cpu",
                     "--eval-scale", "0"]) == 0
    a, b = (load_blob(str(tmp_path / n / "ckpt" / "state.pt")) for n in ("a", "b"))
    assert a["step"] == b["step"] == 1 and a["opt"]["state"]  # a real optimizer step was taken
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_training_from_the_shipped_weights_exports_and_reports_every_kind(tmp_path, capsys):
    """The lead's GPU command, on the CPU for one step: --init, a wall-clock limit, export, final per-kind eval."""
    import json

    from videoxl.demo.train_tiny import main

    out = tmp_path / "run"
    assert main(["--out", str(out), "--init", videoxl.demo_model_path(), "--minutes", "5", "--total-steps", "1",
                 "--frames", "16", "--device", "cpu", "--eval-lengths", "16", "--eval-scale", "0.01",
                 "--head-warmup", "1", "--export"]) == 0
    final = json.load(open(out / "train_log.json"))["eval"][-1]
    assert final["step"] == 1 and set(final["acc"]) == set(shapes.KINDS)
    assert "eval step 1 len 16" in capsys.readouterr().out
    size = sum(os.path.getsize(out / "model" / f) for f in os.listdir(out / "model"))
    assert size <= 25 * 2**20
    model, tok = videoxl.load(str(out / "model"), device="cpu", dtype=torch.float32)
    shipped, shipped_tok = videoxl.load(videoxl.demo_model_path(), device="cpu", dtype=torch.float32)
    assert tok.backend_tokenizer.to_str() == shipped_tok.backend_tokenizer.to_str()  # the shipped tokenizer
    # --head-warmup 1: the one step trained only the read-outs, so the exported weights are the shipped ones
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in model.state_dict().items())
