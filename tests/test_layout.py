"""The package's shape (issue: a folder per stage, one pipeline, settings passed down) and what came with it:
the weights digest follows the weights, the incremental detokenizer equals a whole decode, the settings object."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import videoxl
from videoxl.decoding.detokenize import Detokenizer
from videoxl.errors import VideoXLError
from videoxl.settings import Settings

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "videoxl")
ASK = dict(max_num_frames=8, generation_config={"max_new_tokens": 4})


def test_import_videoxl_does_not_import_the_demo_task():
    code = "import sys, videoxl; videoxl.demo_model_path(); print(sorted(m for m in sys.modules " \
           "if m.startswith('videoxl.demo.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_at_most_twelve_modules_at_the_top_and_no_file_over_300_lines():
    top = [f for f in os.listdir(PACKAGE) if f.endswith(".py")]
    assert len(top) <= 12, top
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(root, f)) as fh:
                    assert sum(1 for _ in fh) <= 310, f


def test_the_cache_never_sees_a_model_and_stages_do_not_import_upwards():
    """Stages below the pipeline never import it, the model or a front-end."""
    upper = ("videoxl.pipeline", "videoxl.model", "videoxl.serving", "videoxl.batch", "videoxl.cli", "videoxl.demo")
    for stage in ("video", "vision", "language", "prefill", "decoding", "cache", "checkpoint"):
        folder = os.path.join(PACKAGE, stage)
        for f in os.listdir(folder):
            if f.endswith(".py"):
                bad = [m for m in _imports(os.path.join(folder, f)) if m.startswith(upper)]
                # the checkpoint loader builds the model it loads (lazily): the one arrow it needs
                if stage == "checkpoint":
                    bad = [m for m in bad if m != "videoxl.model"]
                assert not bad, (stage, f, bad)


def test_weights_digest_follows_the_weights(tiny_dir, clip_path):
    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32")
    model.chat(clip_path, tok, "What happens?", **ASK)
    model.chat(clip_path, tok, "And then?", **ASK)
    assert model.last_stats["kv_cache"] == "memory"
    with torch.no_grad():
        model.decoder.layers[0].mlp.down_proj.weight.mul_(1.5)  # weights changed in place: old KVs are wrong
    model.chat(clip_path, tok, "And then?", **ASK)
    assert model.last_stats["kv_cache"] == "miss"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["decoder.norm.weight"] += 0.25
    model.load_state_dict(state)
    model.chat(clip_path, tok, "And then?", **ASK)
    assert model.last_stats["kv_cache"] == "miss"


def test_incremental_detokenizer_equals_a_whole_decode(tiny):
    """Linear-time pieces that add up to `decode(all ids)`, multi-byte characters split across tokens too (the
    tiny tokenizer is byte-level BPE: 'é', '日本' and an emoji are several tokens each)."""
    _, tok = tiny
    text = "Le café coûte 3€ — 日本語のテキスト 🎬🎥 fin."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2
    for cut in (None, len(ids) - 1, len(ids) - 2):  # also answers that stop mid-character
        d = Detokenizer(tok)
        pieces = [d.add(i) for i in ids[:cut]]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + d.flush() == tok.decode(ids[:cut], skip_special_tokens=True)


def test_incremental_detokenizer_without_a_tokenizers_backend(tiny):
    """A tokenizer with no `backend_tokenizer` gets the window kept by hand: the same text."""
    _, tok = tiny

    class Plain:
        def decode(self, ids, skip_special_tokens=True):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok("naïve 日本 🎬 ok", add_special_tokens=False)["input_ids"]
    d = Detokenizer(Plain())
    assert "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids)


def test_settings_are_validated_once_and_passed_down(tiny, clip_path):
    model, tok = tiny
    with pytest.raises(VideoXLError, match="needs chunk prefill"):
        Settings.build(None, {"budget": 0.5})
    with pytest.raises(VideoXLError, match="chunk_size"):
        Settings.build({"chunk_size": 0})
    with pytest.raises(VideoXLError, match="must be a videoxl.settings.Settings"):
        model.chat(clip_path, tok, "q", settings={"prefill": None})
    s = Settings.build({"chunk_prefill_mode": "mask", "chunk_size": 4, "step_size": 1}, None, {"max_new_tokens": 3})
    model.chat(clip_path, tok, "What happens?", max_num_frames=8, settings=s)
    assert model.last_stats["prefill"] == "mask" and model.last_stats["generated_tokens"] <= 3
    assert model.config.enable_chunk_prefill is False  # nothing written into the checkpoint's config


def test_cli_demo_with_a_missing_file_is_an_error(capsys):
    from videoxl.cli.main import main

    assert main(["chat", "--demo", "typo.mp4"]) == 2
    assert capsys.readouterr().err.strip().endswith("video not found: typo.mp4")


def test_serve_shares_the_chat_options_and_checks():
    from videoxl.cli.main import build_parser
    from videoxl.cli.options import settings_from_args

    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--chunk-size", "8"])
    with pytest.raises(VideoXLError, match="only applies with --chunk-prefill"):
        settings_from_args(args)
    args = parser.parse_args(["serve", "--model", "m", "--chunk-prefill", "streaming", "--sparse",
                              "--sparse-budget", "0.5"])
    s = settings_from_args(args)
    assert s.prefill.chunk_prefill_mode == "streaming" and s.sparse.budget == 0.5
