"""What the command line prints around an answer: the loading line, warnings, the one-line cost report, JSON,
and the question prompt of interactive mode. stdout carries answers only; everything else goes to stderr."""
from __future__ import annotations

import json
import sys
import time
import warnings

from videoxl.errors import VideoXLWarning
from videoxl.timeline import idle_waiting, merged

PROMPT = "question> "
QUIT = {"exit", "quit", ":q"}


def err(text: str, end: str = "\n") -> None:
    print(text, file=sys.stderr, end=end, flush=True)


def show_warnings_as_lines() -> None:
    """videoxl's warnings as `warning: ...` lines (not Python's file:line form); others unchanged."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, VideoXLWarning):
            err(f"warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


class Loading:
    """`loading DIR ...` on a terminal while the (slow) model load runs, replaced by `loaded DIR (3.2 s)`; off a
    terminal only the second line. A failed load leaves only its error line."""

    def __init__(self, model_dir: str):
        self.model_dir, self.tty = model_dir, sys.stderr.isatty()

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.tty:
            err(f"loading model from {self.model_dir} ...", end="")
        return self

    def __exit__(self, kind, value, tb):
        clear = "\r\x1b[K" if self.tty else ""
        if kind is None:
            err(f"{clear}loaded model from {self.model_dir} ({time.perf_counter() - self.t0:.1f} s)")
        elif clear:
            err(clear, end="")
        return False


class AnswerTimer:
    """Wall time of an answer and of its first piece of text, measured around `chat` by its `on_text`."""

    def __init__(self, write=None):
        self.write, self.first, self.t0 = write, None, time.perf_counter()

    def __call__(self, piece: str) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        if self.write is not None:
            self.write(piece)

    def finish(self, stats: dict) -> dict:
        """Add the answer's wall time and its first text's time, measured here (the engine's own token counts
        and rates, where it reports them, are kept as they are)."""
        total = time.perf_counter() - self.t0
        return dict(stats, answer_s=round(total, 3),
                    first_text_s=round(self.first if self.first is not None else total, 3))


def report(s: dict, device_type: str = "cuda") -> str:
    """One line on what the last question cost: frames, blocks, attention share, times, tokens/s, memory."""
    frames = f"{s['frames']} frames"
    if s.get("frames_expected", s["frames"]) > s["frames"]:
        frames += f" (of {s['frames_expected']} expected: the video ended early)"
    parts = [frames, f"{s['groups']} groups of 4", f"{s['prompt_tokens']} prompt tokens"]
    if s.get("cache_hit"):
        parts.append("cache hit: the video's KVs were reused (no frame decoding, vision or video prefill)")
    else:
        parts.append(f"prefill {s['prefill']}")
        if "blocks" in s:
            offloaded = s.get("offload") and device_type == "cuda"  # on a CPU there is nowhere to offload to
            parts.append(f"{s['blocks']} blocks, {100 * s['attended_share']:.1f}% of attention pairs computed"
                         + (", KVs offloaded to CPU memory" if offloaded else ""))
        if "video_decode_s" in s:
            parts.append(f"video: {s['video_decoder']} read {s['video_frames_read']} source frames in "
                         f"{s['video_decode_s']:.2f}s")
        parts += frame_rates(s)
        for key, name in (("vision_s", "frame decoding + vision"), ("prefill_s", "prefill")):
            if key in s:
                parts.append(f"{name} {s[key]:.2f}s")
    if "dense_blocks" in s:
        spans = ", ".join(f"{a:g}-{b:g}s" for a, b in s["dense_blocks"])
        parts.append(f"bi-level: {len(s['dense_blocks'])} of {s['blocks']} blocks dense ({spans}), "
                     f"{100 * s['kept_share']:.0f}% of the video's KVs kept")
    if s.get("ttft_s") is not None:
        parts.append(f"first token {s['ttft_s']:.2f}s")
    elif "first_text_s" in s:
        parts.append(f"first text {s['first_text_s']:.2f}s")
    if "answer_s" in s:
        parts.append(f"answer {s['answer_s']:.2f}s")
    if "generated_tokens" in s:
        rate = f" at {s['decode_tokens_per_s']:.1f} tokens/s" if s.get("decode_tokens_per_s") else ""
        path = f" ({s['decode_path']} decode)" if s.get("decode_path") else ""
        parts.append(f"{s['generated_tokens']} tokens generated{rate}{path}")
    if "peak_gpu_gb" in s:
        parts.append(f"peak GPU {s['peak_gpu_gb']:.1f} GiB")
    return "[" + ", ".join(parts) + "]"


def frame_rates(s: dict) -> list[str]:
    """Frames decoded and frames encoded, each with its rate over its own stage's span (from the question's
    timeline), and how long the vision tower waited for frames: which side held the other up."""
    events, frames = s.get("timeline") or [], s.get("frames")
    decode = [(a, b) for stage, a, b in events if stage == "decode"]
    vision = merged(events, ["vision"])
    if not frames or not decode or not vision:
        return []
    took = max(b for _, b in decode) - decode[0][0]
    busy = sum(b - a for a, b in vision)
    return [f"{frames} frames decoded in {took:.2f}s ({frames / max(took, 1e-9):.1f}/s)",
            f"{frames} encoded at {frames / max(busy, 1e-9):.1f}/s while encoding "
            f"(waited {idle_waiting(events):.2f}s for frames)"]


def json_line(question: str, answer: str, stats: dict) -> str:
    return json.dumps({"question": question, "answer": answer, "stats": stats}, ensure_ascii=False)


def questions(first: str | None):
    """The first question (if given), then one per line from stdin, until end of input or `exit`. No question at
    all is an error (a script that meant to pass one should not end silently)."""
    from videoxl.errors import VideoXLError

    asked = 0
    if first is not None:
        asked += 1
        yield first
    tty = sys.stdin.isatty()
    if tty:
        err("one question per line; 'exit' or Ctrl-D ends (follow-ups reuse the video's prefill)")
    while True:
        if tty:
            err(PROMPT, end="")
        line = sys.stdin.readline()
        if not line or line.strip().lower() in QUIT:
            break
        if line.strip():
            asked += 1
            yield line.strip()
    if not asked:
        raise VideoXLError("no question: give one after VIDEO, or type questions one per line (-i)")
