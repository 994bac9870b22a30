"""What a new user meets first on the command line: checks before the load, files not overwritten, what a run
reports (JSON, cache hits, frames read, defaults, version), and an interactive loop on one loaded model."""
import io
import json
import os
import re

import pytest
import torch

import videoxl
from videoxl.cli.main import build_parser, main
from videoxl.cli.console import report

FAST = ["--max-new-tokens", "4", "--no-progress"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model would be loaded."""
    monkeypatch.setattr(videoxl, "load", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "error: generation_config: temperature must be a number >= 0, got -1.0"),
    (["--top-k", "-3"], "error: generation_config: top_k must be an integer >= 0, got -3"),
    (["--max-new-tokens", "0"], "error: generation_config: max_new_tokens must be a positive integer, got 0"),
    (["--max-num-frames", "0"], "error: max_num_frames must be a positive integer, got 0"),
    (["--max-sample-fps", "-2"], "error: max_sample_fps must be a positive number or None, got -2.0"),
    (["--chunk-size", "8"], "error: --chunk-size only applies with --chunk-prefill streaming|mask: add it, or "
                            "drop it"),
    (["--step-size", "2", "--offload"], "error: --step-size, --offload only apply with --chunk-prefill "
                                        "streaming|mask: add it, or drop them"),
    (["--chunk-prefill", "streaming", "--sparse-budget", "8", "--dense-times", "1-2"],
     "error: --sparse-budget, --dense-times only apply with --sparse: add it, or drop them"),
    (["--chunk-prefill", "mask", "--chunk-size", "3", "--step-size", "2"],
     "error: prefill_config: step_size (2) must divide chunk_size (3)"),
])
def test_settings_checked_before_the_load(tiny_dir, clip_path, capsys, no_load, args, message):
    assert main(["chat", clip_path, "q", "--model", tiny_dir, *args]) == 2
    assert one_error_line(capsys) == message


def test_bad_video_file_checked_before_the_load(tiny_dir, tmp_path, capsys, no_load):
    text = tmp_path / "notes.mp4"
    text.write_text("hello, this is not a video")
    assert main(["chat", str(text), "q", "--model", tiny_dir]) == 2
    assert one_error_line(capsys).startswith(f"error: not a readable video: {text}")


def test_make_tiny_refuses_a_non_empty_folder(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "config.json").write_text('{"mine": true}')
    assert main(["make-tiny", str(target)]) == 2
    assert one_error_line(capsys) == (f"error: {target} is not empty (1 entries), its files would be overwritten: "
                                      "pick a new or empty folder, or add --force")
    assert (target / "config.json").read_text() == '{"mine": true}' and os.listdir(target) == ["config.json"]
    assert main(["make-tiny", str(target), "--force"]) == 0
    assert json.loads((target / "config.json").read_text())["videoxl_random_weights"] is True


def test_make_tiny_into_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["make-tiny", str(target)]) == 2
    assert one_error_line(capsys) == f"error: {target} exists and is not a folder"


def test_chat_and_inspect_name_random_weights(tiny_dir, clip_path, capsys):
    assert main(["chat", clip_path, "q", "--model", tiny_dir, *FAST]) == 0
    err = capsys.readouterr().err
    assert f"note: {tiny_dir} holds RANDOM weights (made by `videoxl make-tiny`): the answers are noise" in err
    assert f"loaded model from {tiny_dir} (" in err  # the line while/after the model loads
    assert main(["inspect", tiny_dir]) == 0
    assert "weights: RANDOM" in capsys.readouterr().out


def test_report_line_names_frame_decoding_and_times(tiny_dir, clip_path, capsys):
    assert main(["chat", clip_path, "q", "--model", tiny_dir, *FAST]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"frame decoding \+ vision \d+\.\d\ds, prefill \d+\.\d\ds", line), line
    assert re.search(r"first (text|token) \d+\.\d\ds, answer \d+\.\d\ds", line), line


def test_report_of_engine_counts_and_a_cut_video():
    stats = {"frames": 13, "frames_expected": 40, "groups": 4, "prompt_tokens": 700, "prefill": "dense",
             "vision_s": 1.0, "prefill_s": 0.5, "ttft_s": 0.61, "answer_s": 2.0, "generated_tokens": 57,
             "decode_tokens_per_s": 41.25, "decode_path": "captured"}
    assert report(stats) == ("[13 frames (of 40 expected: the video ended early), 4 groups of 4, 700 prompt tokens, "
                             "prefill dense, frame decoding + vision 1.00s, prefill 0.50s, first token 0.61s, "
                             "answer 2.00s, 57 tokens generated at 41.2 tokens/s (captured decode)]")


def test_report_shows_frames_decoded_and_encoded_with_their_rates():
    stats = {"frames": 8, "groups": 2, "prompt_tokens": 300, "prefill": "dense",
             "timeline": [("decode", 0.0, 1.0), ("vision", 1.0, 1.5), ("decode", 1.0, 2.0), ("vision", 2.5, 3.0)]}
    assert ("8 frames decoded in 2.00s (4.0/s), 8 encoded at 8.0/s while encoding (waited 1.00s for frames)"
            in report(stats))


def test_cut_video_warns_on_the_command_line(tiny_dir, cut_video, capsys):
    assert main(["chat", cut_video, "q", "--model", tiny_dir, "--max-num-frames", "40", "--sample-fps", "none",
                 *FAST]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^warning: video ended early: 12 of 40 expected frames read from .*cut\.mp4", err, re.M), err
    assert "12 frames (of 40 expected: the video ended early)" in err


def test_json_output(tiny, tiny_dir, clip_path, capsys):
    assert main(["chat", clip_path, "What happens?", "--model", tiny_dir, "--json", "--device", "cpu",
                 "--max-new-tokens", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tokenizer = tiny
    expected = model.chat(clip_path, tokenizer, "What happens?", generation_config={"max_new_tokens": 6})
    assert out["question"] == "What happens?" and out["answer"] == expected
    stats = out["stats"]
    assert stats["frames"] == 6 and stats["timestamps"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert stats["cache_hit"] is False and stats["answer_s"] > 0


def test_interactive_loop_loads_once_and_reuses_the_video(tiny_dir, clip_path, capsys, monkeypatch):
    loads = []
    real_load = videoxl.load
    monkeypatch.setattr(videoxl, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO("What happens?\n\nAnd then?\nexit\nnever asked\n"))
    assert main(["chat", clip_path, "--model", tiny_dir, *FAST]) == 0
    out, err = capsys.readouterr()
    reports = [line for line in err.splitlines() if line.startswith("[")]
    assert len(loads) == 1 and len(out.strip().splitlines()) == 2 and len(reports) == 2
    assert "cache hit" not in reports[0] and "frame decoding + vision" in reports[0]
    assert "cache hit: the video's KVs were reused" in reports[1] and "frame decoding + vision" not in reports[1]


def test_interactive_flag_after_a_question(tiny_dir, clip_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("And then?\n"))
    assert main(["chat", clip_path, "What happens?", "-i", "--model", tiny_dir, *FAST, "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["question"] for a in answers] == ["What happens?", "And then?"]
    assert [a["stats"]["cache_hit"] for a in answers] == [False, True]


def test_no_question_and_nothing_on_stdin_is_an_error(tiny_dir, clip_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", clip_path, "--model", tiny_dir, *FAST]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: no question: give one after VIDEO, or type questions one per line (-i)")


def test_out_of_memory_exit_code(tiny_dir, clip_path, capsys, monkeypatch):
    from videoxl.language.decoder import Qwen2Decoder

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(Qwen2Decoder, "forward", boom)
    assert main(["chat", clip_path, "q", "--model", tiny_dir, *FAST]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: out of GPU memory while answering; try fewer frames (max_num_frames, now 150)")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"videoxl {videoxl.__version__}"


def test_every_option_shows_its_default():
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name, sub in [("videoxl", parser)] + list(subparsers.items()):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            text = formatter._get_help_string(action)
            assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"


def test_readme_synopsis_shows_the_real_defaults():
    """Every `[--option VALUE]` in the README's command-line synopsis is that option's default."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    synopsis = readme.split("## Command line", 1)[1].split("```")[1]
    parser = build_parser()
    chat = parser._subparsers._group_actions[0].choices["chat"]
    defaults = {a.option_strings[-1]: a.default for a in chat._actions if a.option_strings}
    # PrefillConfig's and SparseConfig's, which apply with --chunk-prefill / --sparse
    chunk = {"--chunk-size": 4, "--step-size": 1, "--vision-chunk": 24, "--sparse-budget": 0.25,
             "--sparse-compression": 4}
    shown = re.findall(r"\[(--[a-z-]+) ([^\]\s|]+)\]", synopsis)
    assert len(shown) >= 12, shown
    for option, value in shown:
        default = chunk.get(option, defaults[option])
        if default is None:
            assert value == "none", (option, value)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(value) == default, (option, value, default)
        else:
            assert value == str(default), (option, value, default)
    flags = set(re.findall(r"\[(--[a-z-]+)\]", synopsis))
    assert {"--do-sample", "--offload", "--json"} <= flags
