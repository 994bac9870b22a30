"""Prompt assembly: Qwen ChatML with the video spliced into the first user turn.

The video becomes, for each group of 4 frames: the tokens of `Time {t}s:` (t = the group's first frame's
timestamp printed as a Python float, each string tokenised on its own), then `tokens_per_group` placeholder
positions whose embeddings are replaced by that group's visual tokens. Nothing separates groups.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from videoxl.config import FRAMES_PER_GROUP

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
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


def encoder(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def start_prompt(tokenizer, timestamps: list[float] = ()) -> VideoPrompt:
    """The prompt's text before the video; `add_group` extends it (live video adds groups as they arrive)."""
    ids = encoder(tokenizer)(SYSTEM + USER)
    return VideoPrompt(ids, timestamps=list(timestamps), video_end=len(ids))


def add_group(prompt: VideoPrompt, tokenizer, t: float, tokens_per_group: int, placeholder_id: int) -> None:
    """Append one group: `Time {t}s:` (tokenised on its own) and its visual placeholders. The prompt must end
    with the video (no question yet)."""
    ids = prompt.input_ids
    prompt.group_starts.append(len(ids))
    ids += encoder(tokenizer)(f"Time {float(t)}s:")
    prompt.visual_positions.extend(range(len(ids), len(ids) + tokens_per_group))
    ids += [placeholder_id] * tokens_per_group
    prompt.video_end = len(ids)


def question_ids(tokenizer, question: str, history: list[tuple[str, str]] | None = None) -> list[int]:
    """The tokens after the video: the chat history's turns, then the question and the assistant's header."""
    turns = (history or []) + [(question, None)]
    text = ""
    for i, (q, a) in enumerate(turns):
        text += ("\n" if i == 0 else USER) + q + END + ASSISTANT
        if a is not None:
            text += a + END
    return encoder(tokenizer)(convert_times(text))


def build_prompt(tokenizer, question: str, timestamps: list[float], tokens_per_group: int,
                 placeholder_id: int, history: list[tuple[str, str]] | None = None) -> VideoPrompt:
    prompt = start_prompt(tokenizer, timestamps)
    for t in group_timestamps(timestamps):
        add_group(prompt, tokenizer, t, tokens_per_group, placeholder_id)
    prompt.input_ids += question_ids(tokenizer, question, history)
    return prompt
