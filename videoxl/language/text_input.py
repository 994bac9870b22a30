"""User text checked before it reaches a tokenizer: valid Unicode, a system message, a real tokenizer, and the
token cap on question + history (with `fit_history`, which drops the oldest turns to stay under it)."""
from __future__ import annotations

from videoxl.errors import VideoXLError
from videoxl.language.prompt import DEFAULT_SYSTEM

# Question + chat history, in tokens. Far above any real question, far below the decoder's context (32,768 for
# Qwen2.5-7B), and small enough that the question's prefill (its attention over the video) stays in memory.
MAX_TEXT_TOKENS = 8192


def check_tokenizer(tokenizer) -> None:
    if not all(callable(getattr(tokenizer, name, None)) for name in ("__call__", "decode", "convert_tokens_to_ids")):
        raise VideoXLError(f"tokenizer must be the tokenizer `videoxl.load` returned (a transformers tokenizer), "
                           f"got {type(tokenizer).__name__}")


def check_text(name: str, text: str) -> None:
    """Text a tokenizer can take: valid Unicode (no lone surrogates such as "\\ud800", which JSON can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise VideoXLError(f"{name} is not valid Unicode text: a lone surrogate (U+{ord(text[e.start]):04X}) at "
                           f"character {e.start}") from None


def check_system(system) -> str | None:
    """A custom system message, or None for the model's default (the default's text is the same as None, so
    both share cached video KVs)."""
    if system is None:
        return None
    if not isinstance(system, str):
        raise VideoXLError(f"system must be a string or None, got {type(system).__name__}")
    check_text("system", system)
    return None if system.strip() == DEFAULT_SYSTEM else system


def text_limit(config) -> int:
    return min(MAX_TEXT_TOKENS, getattr(config.text, "max_position_embeddings", MAX_TEXT_TOKENS))


def text_tokens(tokenizer, texts: list[str], limit: int) -> int:
    """Tokens of `texts`, counted only when their UTF-8 bytes exceed `limit` (byte-level BPE: a token is at
    least one byte, so fewer bytes cannot be too many tokens)."""
    n = sum(len(t.encode()) for t in texts)
    if n <= limit:
        return n
    return sum(len(tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]) for t in texts)


def fit_history(config, tokenizer, question: str, history: list) -> tuple[list, int]:
    """The newest (question, answer) pairs of `history` that fit the text cap with `question`, and how many
    turns were dropped: a long interactive chat goes on instead of ending at the cap."""
    pairs, limit = list(history), text_limit(config)
    if text_tokens(tokenizer, [question] + [t for pair in pairs for t in pair], limit) <= limit:
        return pairs, 0
    sizes = [text_tokens(tokenizer, list(pair), 0) for pair in pairs]  # limit 0: always counted exactly
    room = limit - text_tokens(tokenizer, [question], 0)
    keep = len(pairs)
    while keep and sum(sizes[len(pairs) - keep:]) > room:
        keep -= 1
    return pairs[len(pairs) - keep:], len(pairs) - keep
