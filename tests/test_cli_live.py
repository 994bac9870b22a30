"""`videoxl live`: following a growing file and the shapes demo, questions from stdin, each answer with the stretch
of video it covers; user errors are one line and exit code 2."""
import io
import sys

import pytest

from tests.test_live import write_ts
from videoxl.cli.main import main


def run(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["live", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_follows_a_file_and_answers(tiny_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "rec.ts"
    write_ts(path, 0, 80)  # 8 s at 10 fps
    code, out, err = run(monkeypatch, capsys, [str(path), "--model", tiny_dir, "--wait-frames", "8",
                                              "--max-new-tokens", "3", "--chunk-prefill", "streaming"],
                         "What moves?\nexit\n")
    assert code == 0, err
    assert "following" in err and "[covers 0-7 s: 8 frames in 2 groups]" in err
    assert len(out.strip().splitlines()) == 1  # the answer


def test_demo_checks_answers_against_what_was_shown(tiny_dir, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, ["--demo", "--model", tiny_dir, "--seconds", "16", "--speed", "0",
                                              "--demo-seed", "1", "--wait-frames", "16", "--max-new-tokens", "2"],
                         "What colour is the star?\n")
    assert code == 0, err
    assert "playing shapes video seed 1 (16 s)" in err and "[covers 0-15 s: 16 frames in 4 groups]" in err
    assert "[expected over what was shown: " in err


@pytest.mark.parametrize("argv, words", [
    ([], "give a SOURCE to follow, or --demo"),
    (["nowhere.ts", "--model", "x"], "live source not found: nowhere.ts"),
    (["--demo", "x.ts"], "give a SOURCE to follow, or --demo (not both)"),
    (["x://stream"], "give --model DIR"),
    (["x://stream", "--model", "m", "--step-size", "2"], "--step-size only applies with --chunk-prefill"),
])
def test_user_errors(monkeypatch, capsys, argv, words):
    code, _, err = run(monkeypatch, capsys, argv)
    assert code == 2 and words in err, err
