"""The tokenizer a checkpoint folder ships, read without importing transformers on the first question's path.

Measured on an H200 host (`bench/launch_profile.py`, 2026-11-30): a fresh `videoxl chat` process spent 7.4 s of its
21 s to the first token importing transformers for `AutoTokenizer` (15 s with the first video's 12 decoder threads
beside it; the weights took 2 s). A folder with `tokenizer.json` (every Qwen2.5 release has one) is read here by
the `tokenizers` library, the one transformers' fast tokenizer wraps, and the calls videoxl makes (encode, decode,
special-token ids) are answered with that library's own functions, as transformers answers them. Anything else a
caller asks of the tokenizer (`apply_chat_template`, `return_tensors=...`) goes to transformers' tokenizer for the
same folder, loaded the first time it is needed. A folder with only `vocab.json` + `merges.txt` is loaded by
transformers as before.
"""
from __future__ import annotations

import json
import os
import threading

from videoxl.errors import VideoXLError


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (what `decode` applies when the folder asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


_transformers_lock = threading.Lock()  # transformers' lazy imports are not thread-safe (serve loads a model per
# GPU in threads: two first imports at once failed with "cannot import name 'AutoTokenizer'")


def load_transformers_tokenizer(model_dir: str):
    with _transformers_lock:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it warns that config.json's `llava_qwen` is not a type it knows
        try:
            return AutoTokenizer.from_pretrained(model_dir)
        except Exception as e:  # transformers raises many types here
            raise VideoXLError(f"cannot load the tokenizer from {model_dir}: {str(e).splitlines()[0][:200]}") \
                from None
        finally:
            hf_logging.set_verbosity(level)


class FolderTokenizer:
    """A checkpoint folder's `tokenizer.json` through the `tokenizers` library, answering as transformers' fast
    tokenizer does for the calls videoxl makes."""

    def __init__(self, model_dir: str):
        from tokenizers import Tokenizer

        self.model_dir = model_dir
        path = os.path.join(model_dir, "tokenizer.json")
        try:
            self.backend_tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise VideoXLError(f"cannot load the tokenizer from {path}: {str(e).splitlines()[0][:200]}") from None
        config = {}
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(config_path):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise VideoXLError(f"unreadable tokenizer_config.json in {model_dir}: {e}") from None
            if not isinstance(config, dict):
                raise VideoXLError(f"tokenizer_config.json in {model_dir} is not a JSON object")
        self.eos_token, self.pad_token, self.bos_token, self.unk_token = (
            _token_text(config.get(k)) for k in ("eos_token", "pad_token", "bos_token", "unk_token"))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._split = None  # a second backend that reads special-token text as plain text (split_special_tokens)
        self._hf = None
        self._lock = threading.Lock()

    # ---- what videoxl calls ----------------------------------------------------------------------------------
    def __call__(self, text, add_special_tokens: bool = True, split_special_tokens: bool = False, **kwargs):
        if kwargs:  # return_tensors, padding, truncation, ...: transformers' own
            return self.transformers(text, add_special_tokens=add_special_tokens,
                                     split_special_tokens=split_special_tokens, **kwargs)
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens, split_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        ids = [self.encode(t, add_special_tokens, split_special_tokens) for t in text]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        backend = self._splitting() if split_special_tokens else self.backend_tokenizer
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _splitting(self):
        with self._lock:
            if self._split is None:
                from tokenizers import Tokenizer

                split = Tokenizer.from_str(self.backend_tokenizer.to_str())
                split.encode_special_tokens = True  # what transformers sets for split_special_tokens=True
                self._split = split
            return self._split

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if kwargs:
            return self.transformers.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._id(tokens)
        return [self._id(t) for t in tokens]

    def _id(self, token: str) -> int | None:
        i = self.backend_tokenizer.token_to_id(token)
        return i if i is not None else (self.backend_tokenizer.token_to_id(self.unk_token) if self.unk_token else None)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token) if self.pad_token else None

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend_tokenizer.get_added_tokens_decoder()

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- everything else: transformers' tokenizer, loaded once when first needed ---------------------------
    @property
    def transformers(self):
        with self._lock:
            if self._hf is None:
                self._hf = load_transformers_tokenizer(self.model_dir)
            return self._hf

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_hf", "_lock", "_split", "model_dir"):
            raise AttributeError(name)  # never load transformers for Python's own protocol lookups
        return getattr(self.transformers, name)

    def __repr__(self) -> str:
        return f"FolderTokenizer({self.model_dir!r}, {len(self)} tokens)"
