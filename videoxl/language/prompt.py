"""Prompt assembly: Qwen ChatML with the video spliced into the first user turn.

The video becomes, for each group of 4 frames: the tokens of `Time {t}s:` (t = the group's first frame's
timestamp printed as a Python float, each string tokenised on its own), then `tokens_per_group` placeholder
positions whose embeddings are replaced by that group's visual tokens. Nothing separates groups.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from videoxl.config import FRAMES_PER_GROUP
from videoxl.errors import VideoXLError

DEFAULT_SYSTEM = "You are a helpful assistant."
SYSTEM = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
START, IM_END = "<|im_start|>", "<|im_end|>"
CONTROL = (START, IM_END)
MMSS = re.compile(r"(\d{2}:\d{2})")


def convert_times(text: str) -> str:
    """`MM:SS` -> `N seconds`, as the reference rewrites prompts (timestamps in the video are in seconds)."""
    for original in MMSS.findall(text):
        minutes, seconds = map(int, original.split(":"))
        text = text.replace(original, f"{minutes * 60 + seconds} seconds")
    return text


@dataclass
class VideoPrompt:
    input_ids: list[int]  # placeholder id at visual positions
    visual_positions: list[int] = field(default_factory=list)  # where visual tokens go, in order
    group_starts: list[int] = field(default_factory=list)  # first token (of `Time ...s:`) of each group
    video_end: int = 0  # one past the last video token
    timestamps: list[float] = field(default_factory=list)  # per frame, padded to whole groups

    def __len__(self) -> int:
        return len(self.input_ids)


def group_timestamps(frame_timestamps: list[float]) -> list[float]:
    return list(frame_timestamps[::FRAMES_PER_GROUP])


def normalise_history(chat_history) -> list[tuple[str, str]]:
    """Accept [{"role", "content"}, ...] (what `chat` returns) or [(question, answer), ...]."""
    if not chat_history:
        return []
    if isinstance(chat_history[0], dict):
        users = [m["content"] for m in chat_history if m.get("role") == "user"]
        bots = [m["content"] for m in chat_history if m.get("role") == "assistant"]
        return list(zip(users, bots))
    return [(q, a) for q, a in chat_history]


TIME_TOKENS = 9  # tokens of one `Time 123.5s:` string (Qwen2 splits digits)
SYSTEM_TOKENS = 40  # the system prompt and the user turn's opening, rounded up


def prompt_tokens(config, frames: int, text_tokens: int = SYSTEM_TOKENS) -> int:
    """Prompt tokens up to the end of the video, before the frames are seen: `text_tokens` of text, then per
    group of 4 frames a `Time …s:` string and its visual tokens. The one place that counts it: the memory check,
    the video cache's room and the bi-level budget all read it."""
    groups = -(-frames // FRAMES_PER_GROUP)
    return text_tokens + groups * (config.tokens_per_group + TIME_TOKENS)


def start_prompt(tokenizer, timestamps: list[float] = (), system: str | None = None) -> VideoPrompt:
    """The prompt's text before the video; `add_group` extends it (live video adds groups as they arrive).
    `system` replaces the default system text."""
    ids = encode_chat(tokenizer, [START, "system\n", (DEFAULT_SYSTEM if system is None else system), IM_END,
                                  "\n", START, "user\n"])
    return VideoPrompt(ids, timestamps=list(timestamps), video_end=len(ids))


def add_group(prompt: VideoPrompt, tokenizer, t: float, tokens_per_group: int, placeholder_id: int) -> None:
    """Append one group: `Time {t}s:` (tokenised on its own) and its visual placeholders. The prompt must end
    with the video (no question yet)."""
    ids = prompt.input_ids
    prompt.group_starts.append(len(ids))
    ids += _encode(tokenizer, f"Time {float(t)}s:", False)
    prompt.visual_positions.extend(range(len(ids), len(ids) + tokens_per_group))
    ids += [placeholder_id] * tokens_per_group
    prompt.video_end = len(ids)


def question_ids(tokenizer, question: str, history: list[tuple[str, str]] | None = None) -> list[int]:
    """The tokens after the video: the chat history's turns, then the question and the assistant's header."""
    parts = []
    for i, (q, a) in enumerate((history or []) + [(question, None)]):
        parts += ["\n"] if i == 0 else [START, "user\n"]
        parts += [convert_times(q), IM_END, "\n", START, "assistant\n"]
        if a is not None:
            parts += [convert_times(a), IM_END, "\n"]
    return encode_chat(tokenizer, parts)


def build_prompt(tokenizer, question: str, timestamps: list[float], tokens_per_group: int,
                 placeholder_id: int, history: list[tuple[str, str]] | None = None,
                 system: str | None = None) -> VideoPrompt:
    """The ChatML prompt, video spliced into the first user turn. `system` replaces the default system text.

    User text (system, question, history) is tokenised with its special-token strings split into plain text, so
    `<|im_end|>` or `<|vision_pad|>` typed by a user never becomes a control token or a video slot. Tokenisers
    cut text at special tokens before anything else, so encoding each stretch between the template's own
    control tokens gives the ids the joint encoding gave: an ordinary prompt is token for token what it was."""
    prompt = start_prompt(tokenizer, timestamps, system)
    for t in group_timestamps(timestamps):
        add_group(prompt, tokenizer, t, tokens_per_group, placeholder_id)
    prompt.input_ids += question_ids(tokenizer, question, history)
    return prompt


def encode_chat(tokenizer, parts: list[str]) -> list[int]:
    """`parts`: the template's control tokens (START, IM_END) and text; neighbouring text is joined and
    encoded with special-token strings as plain text."""
    ids, text = [], ""
    for part in parts + [None]:
        if part in CONTROL or part is None:
            if text:
                ids += _encode(tokenizer, text, True)
                text = ""
            if part is not None:
                ids += _encode(tokenizer, part, False)
        else:
            text += part
    return ids


def _encode(tokenizer, text: str, plain: bool) -> list[int]:
    if not plain:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if special.intersection(ids):  # a tokenizer that ignored split_special_tokens: never send control tokens
        raise VideoXLError("this tokenizer cannot encode special-token text (<|...|>) in a message as plain text; "
                           "remove it from the message or use a transformers tokenizer")
    return ids
