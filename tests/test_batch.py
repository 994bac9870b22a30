"""`videoxl batch`: answers equal `model.chat` asked one by one (the reference), a video is prefilled once, runs
resume, a bad row fails alone, bad input is one line; two worker processes and Ray actors answer alike."""
import json
import os

import pytest

import videoxl
from videoxl.demo import shapes
from videoxl.cli.main import main

ARGS = ["--demo", "--max-num-frames", "64", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two 64-s task videos, their four questions each, and the answers `model.chat` gives one at a time."""
    folder = tmp_path_factory.mktemp("batch")
    rows = []
    for i in range(2):
        video = shapes.make_video(300_000 + i, 64)
        shapes.write_video(video, str(folder / f"v{i}.mp4"), "mpeg4")
        rows += [{"id": f"v{i}-{kind}", "video": f"v{i}.mp4", "question": q} for kind, q in shapes.QUESTIONS.items()]
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = videoxl.load(videoxl.demo_model_path(), device="cpu")
    reference = {r["id"]: model.chat(str(folder / r["video"]), tok, r["question"], max_num_frames=64,
                                     generation_config={"max_new_tokens": 8}) for r in rows}
    return folder, str(path), reference


def records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def answers(path) -> dict:
    return {r["id"]: r["answer"] for r in records(path) if "answer" in r}


def test_batch_answers_as_chat_and_resumes(batch, capsys):
    folder, inp, reference = batch
    out = str(folder / "out.jsonl")
    assert main(["batch", inp, "-o", out] + ARGS) == 0
    rows = records(out)
    assert answers(out) == reference and len(rows) == 8
    assert [r["stats"]["kv_cache"] for r in rows] == ["miss", "memory", "memory", "memory"] * 2  # one prefill a video
    assert all(r["video"] == str(folder / "v0.mp4") for r in rows[:4])

    # a crash after 3 rows and half a line: the next run keeps those 3, drops the half line, answers the rest
    with open(out, "r+") as f:
        keep = "".join(f.readlines()[:3])
        f.seek(0), f.truncate(), f.write(keep + '{"id": "v0-la')
    capsys.readouterr()
    assert main(["batch", inp, "-o", out] + ARGS) == 0
    assert "5 to answer (3 answered" in capsys.readouterr().err
    assert answers(out) == reference and len(records(out)) == 8
    assert main(["batch", inp, "-o", out] + ARGS) == 0 and len(records(out)) == 8  # nothing left to do


def test_a_bad_video_fails_its_rows_only(batch, capsys):
    folder, inp, reference = batch
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    mixed = folder / "mixed.jsonl"
    mixed.write_text(open(inp).read() + json.dumps({"id": "bad", "video": "broken.mp4", "question": "Why?"}) + "\n")
    out = str(folder / "mixed-out.jsonl")
    assert main(["batch", str(mixed), "-o", out] + ARGS) == 1
    [bad] = [r for r in records(out) if "error" in r]
    assert bad["id"] == "bad" and "broken.mp4" in bad["error"]
    assert answers(out) == reference
    assert "row bad:" in capsys.readouterr().err
    assert main(["batch", str(mixed), "-o", out] + ARGS) == 1  # the failed row is retried, the others skipped
    assert len(records(out)) == 10


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not JSON"),
    ("[1, 2]", "line 1: expected a JSON object, got list"),
    ('{"video": "v0.mp4", "question": "q", "frames": 8}', "line 1: unknown key 'frames'"),
    ('{"video": "nope.mp4", "question": "q"}', "line 1: video not found"),
    ('{"video": "v0.mp4", "question": ""}', 'line 1: "question" must be a non-empty string'),
    ('{"video": 3, "question": "q"}', 'line 1: "video" must be a file path'),
    ('{"video": "v0.mp4", "question": "q", "id": [1]}', 'line 1: "id" must be a string or an integer'),
    ('{"video": "v0.mp4", "question": "q", "max_num_frames": 0}', "line 1: max_num_frames must be a positive"),
    ('{"video": "v0.mp4", "question": "q", "id": 1}\n{"video": "v1.mp4", "question": "q", "id": "1"}',
     "line 2: id '1' is used twice"),
    ("\n\n", "has no rows"),
])
def test_bad_input_rows_are_one_line_errors(batch, tmp_path, capsys, line, message):
    folder, _, _ = batch
    inp = folder / "bad.jsonl"
    inp.write_text(line + "\n")
    assert main(["batch", str(inp), "-o", str(tmp_path / "o.jsonl")] + ARGS) == 2
    e = capsys.readouterr().err
    assert message in e and e.count("\n") == 1 and not os.path.exists(tmp_path / "o.jsonl")


@pytest.mark.parametrize("extra, message", [
    (["--workers", "2"], "--workers only applies with --ray"),
    (["--model", "/nonexistent"], "one of them"),
    (["--devices", "tpu:0"], "device must be"),
    (["--devices", ","], "--devices is empty"),
    (["--sparse"], "--sparse (bi-level decoding) needs --chunk-prefill"),
])
def test_bad_options_are_one_line_errors(batch, tmp_path, capsys, extra, message):
    _, inp, _ = batch
    assert main(["batch", inp, "-o", str(tmp_path / "o.jsonl")] + ARGS + extra) == 2
    e = capsys.readouterr().err
    assert message in e and e.count("\n") == 1


def test_output_must_be_a_file_in_an_existing_folder(batch, tmp_path, capsys):
    _, inp, _ = batch
    assert main(["batch", inp, "-o", str(tmp_path)] + ARGS) == 2
    assert main(["batch", inp, "-o", str(tmp_path / "no" / "o.jsonl")] + ARGS) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_two_worker_processes_answer_alike(batch, capsys):
    folder, inp, reference = batch
    out = str(folder / "two.jsonl")
    assert main(["batch", inp, "-o", out, "--devices", "cpu,cpu"] + ARGS) == 0
    assert answers(out) == reference and len(records(out)) == 8
    assert capsys.readouterr().err.count(": model ready after ") == 2  # each worker says when it could start


@pytest.mark.slow
def test_ray_actors_answer_alike(batch):
    ray = pytest.importorskip("ray")
    folder, inp, reference = batch
    out = str(folder / "ray.jsonl")
    try:
        assert main(["batch", inp, "-o", out, "--ray", "local", "--workers", "2"] + ARGS) == 0
    finally:
        ray.shutdown()
    assert answers(out) == reference and len(records(out)) == 8


def test_worker_processes_split_the_cores_between_them():
    """Each worker process takes its own slice of the batch's cores (its decoders and torch threads are sized by
    them); together they cover every core once; fewer cores than workers leaves every worker all of them."""
    from videoxl.video.read import core_shares

    cores = [0, 1, 2, 3, 5, 8, 9]
    assert core_shares(cores, 2) == [[0, 1, 2], [3, 5, 8, 9]]
    assert core_shares(cores, 1) == [cores]
    assert core_shares([4], 2) == [[4], [4]]


@pytest.mark.slow
def test_a_worker_that_cannot_load_fails_its_first_video_only(batch, capsys, monkeypatch):
    """Each worker takes its first video (and decodes it) before its model loads. The first device's worker,
    a thread of the batch process handed the first video, is made to fail its load: that video's rows fail
    with the reason, the other worker (a process, with the real loader) answers the rest as chat does."""
    from videoxl.batch import runner

    class Broken(runner.Worker):
        def __init__(self, settings, device, first=None):
            raise RuntimeError("no memory left on this device")

    monkeypatch.setattr(runner, "Worker", Broken)
    folder, inp, reference = batch
    out = str(folder / "broken.jsonl")
    assert main(["batch", inp, "-o", out, "--devices", "cpu,cpu"] + ARGS) == 1
    rows = records(out)
    failed = [r for r in rows if "error" in r]
    assert len(rows) == 8 and len(failed) == 4 and {r["video"] for r in failed} == {str(folder / "v0.mp4")}
    assert all("not answered: cpu: RuntimeError: no memory left" in r["error"] for r in failed)
    assert answers(out) == {k: v for k, v in reference.items() if not k.startswith("v0-")}
    assert "model ready after" in capsys.readouterr().err  # the other worker said so


def test_every_load_option_reaches_the_workers(batch, monkeypatch):
    """The workers build their models from `Settings`: each precision option given on the command line is there
    (--kv-dtype was once dropped on the way)."""
    from videoxl.batch import runner

    seen = []

    def fake_run(settings, groups, devices, *rest, **options):
        seen.append(settings)
        return iter(())

    monkeypatch.setattr(runner, "run", fake_run)
    folder, inp, _ = batch
    out = str(folder / "options.jsonl")
    assert main(["batch", inp, "-o", out, "--devices", "cpu", "--quantize", "int8", "--kv-dtype", "fp8",
                 "--dtype", "float32"] + ARGS) == 0
    (s,) = seen
    assert (s.quantize, s.kv_dtype, s.dtype) == ("int8", "fp8", "float32")

