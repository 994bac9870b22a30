"""What bi-level decoding costs in answers: the demo model on held-out "shapes" videos (version 2), per budget,
compression and way of choosing the dense blocks.

    python bench/quality_bilevel.py [--lengths 256 1024] [--videos 100] [--budgets 0.1 0.25 0.5]
                                    [--compressions 4 16] [--selects model random oracle] [--json out]

Each video is prefilled once (chunk prefill 'mask', `chunk_size=16, step_size=4`: blocks of 16 s at 1 fps), then
each of its seven questions is answered over the bi-level cache of every setting. The dense blocks are always the
first and the last; the rest of the budget is chosen
  model   in-model (the question's attention over the pooled blocks, the model card's way);
  random  at random (`sparse_config` select='random', a seed per video and question);
  oracle  the blocks holding the answer's evidence (`ShapesVideo.evidence`: the star's scene for needle and
          digit, it and the next for after, the ring scenes for count, seconds N..N+3 for time) forced dense,
          the remaining budget in-model; when the evidence needs more blocks than the budget, all of them.
kept: the share of the video's KVs in the mixed cache (mean over the questions). Videos: `shapes.make_video(
200000 + i, L)` (held out from training and from bench/quality.py's seeds) unless `--seed` says otherwise, as
1-fps frame lists resized to 384. bench/quality.py runs this grid on its own videos beside the prefill modes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import zlib

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import videoxl  # noqa: E402
from videoxl.demo import shapes  # noqa: E402
from videoxl.prefill.plan import PrefillConfig  # noqa: E402
from videoxl.decoding import decode_step, generate_tokens  # noqa: E402
from videoxl.decoding.bilevel import bilevel_question  # noqa: E402
from videoxl.decoding.sparse_config import SparseConfig  # noqa: E402
from videoxl.decoding.detokenize import Detokenizer  # noqa: E402
from videoxl.decoding.generation import GenerationConfig  # noqa: E402
from videoxl.language.prompt import build_prompt  # noqa: E402
from videoxl.pipeline import build_prefix  # noqa: E402

SEED = 200_000
CHUNKING = PrefillConfig(chunk_prefill_mode="mask", chunk_size=16, step_size=4, chunk_size_for_vision_tower=96)
GEN = GenerationConfig(max_new_tokens=4)  # the longest answer word, 'ring', is 3 tokens of the demo tokenizer
SELECTS = ("model", "random", "oracle")


def grid(budgets, compressions, selects) -> dict[str, dict]:
    """name -> {budget, compression, select}: every combination."""
    return {f"bi-level {s} {b:g} c{c}": {"budget": b, "compression": c, "select": s}
            for s in selects for b in budgets for c in compressions}


def prefill(model, tok, frames):
    """The video's cache entry (prefix KVs, prompt, decode state), built as `chat` builds it (not kept)."""
    return build_prefix(model, frames, tok, "q", [], (len(frames), 1, None), CHUNKING, False, None)


def answer(model, tok, entry, question, settings) -> tuple[str, dict]:
    """One question over the bi-level cache of `entry`; its decode state keeps the pooled level and the mixed
    store (and its captured decode graph) for the video's next question, as `chat` does."""
    timestamps = entry.prompt.timestamps
    prompt = build_prompt(tok, question, timestamps, model.config.tokens_per_group,
                          tok.convert_tokens_to_ids("<|vision_pad|>"))
    tail = torch.tensor(prompt.input_ids[prompt.video_end:], device=model.device)
    mixed, logits, stats = bilevel_question(model.decoder, entry.cache, tail, SparseConfig.from_dict(settings),
                                            timestamps, CHUNKING.groups_per_block, GEN.max_new_tokens, entry.decode)
    stop = {tok.convert_tokens_to_ids("<|im_end|>")}
    step = decode_step(model.decoder, mixed, GEN.max_new_tokens, "auto", entry.decode)
    detok = Detokenizer(tok)
    text = "".join(detok.add(t) for t in generate_tokens(step, logits, GEN, prompt.input_ids, stop,
                                                           model.config.text.vocab_size)) + detok.flush()
    return text, stats


def sparse_settings(setting: dict, video, kind: str) -> dict:
    """The `sparse_config` of one grid setting for one question: the oracle's forced blocks, random's seed."""
    out = {"budget": setting["budget"], "compression": setting["compression"]}
    if setting["select"] == "random":
        out.update(select="random", seed=zlib.crc32(f"{video.seed}/{video.seconds}/{kind}".encode()))
    elif setting["select"] == "oracle":
        out["dense_times"] = [list(span) for span in video.evidence(kind)]
    return out


def ask_grid(model, tok, video, frames, settings: dict[str, dict]) -> dict[str, tuple[dict[str, bool], float]]:
    """name -> ({kind: correct}, mean kept share) for one video over every setting (one prefill)."""
    entry = prefill(model, tok, frames)
    out = {}
    # largest mixed cache first: the smaller ones then reuse its buffers (and its captured decode graph)
    for name, setting in sorted(settings.items(), key=lambda x: (-x[1]["budget"], x[1]["compression"])):
        right, kept = {}, 0.0
        for kind, question in video.questions.items():
            text, stats = answer(model, tok, entry, question, sparse_settings(setting, video, kind))
            right[kind] = shapes.is_correct(text, video.answers[kind])
            kept += stats["kept_share"]
        out[name] = (right, kept / len(right))
    return out


class Tally:
    """Per setting: correct answers per kind, questions per kind, the summed kept share, videos."""

    def __init__(self):
        self.hits, self.asked, self.kept, self.videos = {}, {}, {}, {}

    def add(self, name: str, right: dict[str, bool], kept: float = 1.0) -> None:
        hits, asked = self.hits.setdefault(name, {}), self.asked.setdefault(name, {})
        for kind, ok in right.items():
            hits[kind] = hits.get(kind, 0) + bool(ok)
            asked[kind] = asked.get(kind, 0) + 1
        self.kept[name] = self.kept.get(name, 0.0) + kept
        self.videos[name] = self.videos.get(name, 0) + 1

    def rows(self, seconds: int, meta: dict[str, dict]) -> list[dict]:
        out = []
        for name, hits in self.hits.items():
            acc = {k: round(100 * hits[k] / self.asked[name][k], 1) for k in shapes.KINDS if k in hits}
            out.append({"seconds": seconds, "mode": name, **meta.get(name, {}), "videos": self.videos[name],
                        "kept_share": round(self.kept[name] / self.videos[name], 4), "acc": acc})
        return out


def print_table(rows: list[dict]) -> None:
    """A per-kind table per length (markdown, so it can go into RESULTS.md as it is)."""
    for seconds in sorted({r["seconds"] for r in rows}):
        print(f"\n{seconds} s\n\n| mode | videos | kept | " + " | ".join(shapes.KINDS) + " |")
        print("|---|---:|---:|" + "---:|" * len(shapes.KINDS))
        for r in (r for r in rows if r["seconds"] == seconds):
            print(f"| {r['mode']} | {r['videos']} | {r['kept_share']:.2f} | "
                  + " | ".join(f"{r['acc'].get(k, float('nan')):.1f}" for k in shapes.KINDS) + " |", flush=True)


def run(args) -> dict:
    model, tok = videoxl.load(args.model, device=args.device, dtype=args.dtype)
    settings = grid(args.budgets, args.compressions, args.selects)
    rows = []
    with torch.inference_mode():
        for seconds in args.lengths:
            tally, t0 = Tally(), time.time()
            for i in range(args.videos):
                video = shapes.make_video(args.seed + i, seconds)
                for name, (right, kept) in ask_grid(model, tok, video, shapes.model_frames(video), settings).items():
                    tally.add(name, right, kept)
                if time.time() - t0 > args.time_limit:
                    break
            rows += tally.rows(seconds, settings)
            print(f"  ({time.time() - t0:.0f}s for {seconds}-s videos)", flush=True)
    print_table(rows)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "chunking": "mask 16/4", "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--seed", type=int, default=SEED, help="first held-out seed")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    ap.add_argument("--compressions", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--selects", nargs="+", default=list(SELECTS), choices=SELECTS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--time-limit", type=float, default=1e9, help="seconds per length: stop adding videos after")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.model = args.model or videoxl.demo_model_path()
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
