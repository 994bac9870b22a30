"""The folder tokenizer (checkpoint/tokenizer.py) against transformers' AutoTokenizer on the same folder: the same
ids and text for every call videoxl makes (exact equality, the reference being transformers' fast tokenizer), and
no transformers import on a question's path."""
import subprocess
import sys

import pytest

from videoxl.checkpoint.loader import load_tokenizer
from videoxl.checkpoint.tokenizer import FolderTokenizer, load_transformers_tokenizer
from videoxl.demo import demo_model_path

TEXTS = ["", "Time 12.0s:", "<|im_start|>user\nWhat shape is at the end?<|im_end|>\n", "a <|vision_pad|> b",
         "Héllo wörld — ünïcode ✓ 😀", "  leading and trailing  ", "don't stop . , ! ?", "x" * 300,
         "<|endoftext|><|im_end|>", "\n\n\t tabs"]


@pytest.fixture(params=["tiny", "demo"])
def folder(request, tiny_dir):
    return tiny_dir if request.param == "tiny" else demo_model_path()


def test_matches_transformers(folder):
    ours, ref = FolderTokenizer(folder), load_transformers_tokenizer(folder)
    for text in TEXTS:
        for add in (False, True):
            for split in (False, True):
                assert ours(text, add_special_tokens=add, split_special_tokens=split)["input_ids"] == \
                    ref(text, add_special_tokens=add, split_special_tokens=split)["input_ids"], (text, add, split)
        ids = ref(text, add_special_tokens=False)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours(TEXTS[:3], add_special_tokens=False)["input_ids"] == \
        ref(TEXTS[:3], add_special_tokens=False)["input_ids"]
    for token in ("<|im_end|>", "<|endoftext|>", "<|vision_pad|>", "<|im_start|>", "not-a-token-at-all"):
        assert ours.convert_tokens_to_ids(token) == ref.convert_tokens_to_ids(token), token
    assert ours.eos_token_id == ref.eos_token_id and ours.pad_token_id == ref.pad_token_id
    assert set(ours.added_tokens_decoder) == set(ref.added_tokens_decoder)
    assert len(ours) == len(ref)


def test_other_calls_go_to_transformers(tiny_dir):
    ours, ref = FolderTokenizer(tiny_dir), load_transformers_tokenizer(tiny_dir)
    assert ours._hf is None
    assert ours.all_special_tokens == ref.all_special_tokens  # not ours: handed to transformers' tokenizer
    got = ours("Time 1.0s:", return_tensors="pt")["input_ids"]
    assert got.tolist() == ref("Time 1.0s:", return_tensors="pt")["input_ids"].tolist()
    with pytest.raises(AttributeError):
        ours.no_such_attribute


def test_load_picks_it_only_with_tokenizer_json(tiny_dir, tmp_path):
    assert isinstance(load_tokenizer(tiny_dir), FolderTokenizer)


def test_a_question_never_imports_transformers(tiny_dir, clip_path):
    code = ("import sys, videoxl\n"
            f"m, t = videoxl.load({tiny_dir!r}, device='cpu')\n"
            f"m.chat({clip_path!r}, t, 'What is it?', max_num_frames=8,"
            " generation_config={'max_new_tokens': 3, 'do_sample': False})\n"
            "print('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_malformed_tokenizer_json_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    from videoxl.errors import VideoXLError

    with pytest.raises(VideoXLError, match="cannot load the tokenizer") as e:
        FolderTokenizer(str(tmp_path))
    assert "\n" not in str(e.value)
