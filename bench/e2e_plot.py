"""The timeline figure of bench/e2e.py: one lane per stage, each span a bar over seconds from the question's
start (frame decoding, vision, prefill, the first token, the answer, and the file's hash beside them)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LANES = [("hash", "#999999"), ("decode", "#1f77b4"), ("vision", "#2ca02c"), ("prefill", "#ff7f0e"),
         ("first_token", "#d62728"), ("answer", "#9467bd")]


def timeline_png(events, path: str, title: str) -> str:
    lanes = [(name, colour) for name, colour in LANES if any(e[0] == name for e in events)]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(lanes) + 1.3))
    for y, (name, colour) in enumerate(lanes):
        spans = [(s, max(e - s, 1e-3)) for stage, s, e in events if stage == name]
        ax.broken_barh(spans, (y - 0.35, 0.7), facecolors=colour, edgecolors=colour, linewidth=0.3)
    ax.set_yticks(range(len(lanes)), [name.replace("_", " ") for name, _ in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the question")
    ax.set_xlim(0, max((e for _, _, e in events), default=1) * 1.02)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
