"""What bi-level decoding costs in answers: the shipped tiny model on held-out "shapes" videos, per budget.

    python bench/quality_bilevel.py [--lengths 256 1024] [--videos 20] [--budgets 0.1 0.25 0.5 1.0] [--json out]

Each video is prefilled once (chunk prefill 'mask', `chunk_size=16, step_size=4`: blocks of 16 s at 1 fps), then
each question is answered over the bi-level cache of every setting:
  model B   in-model selection (the question's attention over pooled blocks) at budget B (1.0 = chunked decoding)
  oracle    the blocks holding the star's scene dense (plus the first and last), nothing else
  random    as many blocks as budget 0.25 keeps, chosen at random (plus the first and last)
Recall: the share of videos where, for the needle question, the block holding the middle of the star's scene is
dense (for the 'model' rows: whether the question's attention found the needle). Videos: `shapes.make_video(200000 + i, L)` (held out from training, and from
bench/quality.py's seeds), as 1-fps frame lists resized to 384.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import videoxl  # noqa: E402
from videoxl.demo import shapes  # noqa: E402
from videoxl.prefill.plan import PrefillConfig  # noqa: E402
from videoxl.decoding import decode_step, generate_tokens  # noqa: E402
from videoxl.decoding.bilevel import bilevel_question, block_times  # noqa: E402
from videoxl.decoding.sparse_config import SparseConfig  # noqa: E402
from videoxl.decoding.detokenize import Detokenizer  # noqa: E402
from videoxl.decoding.generation import GenerationConfig  # noqa: E402
from videoxl.language.prompt import build_prompt  # noqa: E402
from videoxl.pipeline import build_prefix  # noqa: E402

SEED = 200_000
CHUNKING = PrefillConfig(chunk_prefill_mode="mask", chunk_size=16, step_size=4, chunk_size_for_vision_tower=96)
GEN = GenerationConfig(max_new_tokens=6)


def prefill(model, tok, frames):
    """The video's prefix KVs and its frames' timestamps, built as `chat` builds them (not kept in the cache)."""
    entry = build_prefix(model, frames, tok, "q", [], (len(frames), 1, None), CHUNKING, False, None)
    return entry.cache, entry.prompt.timestamps


def answer(model, tok, store, timestamps, question, settings) -> tuple[str, dict]:
    prompt = build_prompt(tok, question, timestamps, model.config.tokens_per_group,
                          tok.convert_tokens_to_ids("<|vision_pad|>"))
    tail = torch.tensor(prompt.input_ids[prompt.video_end:], device=model.device)
    mixed, logits, stats = bilevel_question(model.decoder, store, tail, SparseConfig.from_dict(settings), timestamps,
                                            CHUNKING.groups_per_block, GEN.max_new_tokens)
    stop = {tok.convert_tokens_to_ids("<|im_end|>")}
    step = decode_step(model.decoder, mixed, GEN.max_new_tokens)
    detok = Detokenizer(tok)
    text = "".join(detok.add(t) for t in generate_tokens(step, logits, GEN, prompt.input_ids, stop,
                                                           model.config.text.vocab_size)) + detok.flush()
    return text, stats


def star_span(video) -> tuple[float, float]:
    scene = next(s for s in video.scenes if s.shape == "star")
    return float(scene.start), float(scene.end - 1)


def run(args) -> dict:
    model, tok = videoxl.load(args.model, device=args.device, dtype=args.dtype)
    rng = random.Random(0)
    settings = {f"model {b:g}": {"budget": b} for b in args.budgets}
    rows = []
    with torch.inference_mode():
        for seconds in args.lengths:
            hits = {name: {k: 0 for k in shapes.KINDS} for name in list(settings) + ["oracle", "random"]}
            recall = {name: 0 for name in hits}
            kept = {name: 0.0 for name in hits}
            t0 = time.time()
            done = 0
            for i in range(args.videos):
                video = shapes.make_video(SEED + i, seconds)
                store, timestamps = prefill(model, tok, shapes.model_frames(video))
                star = star_span(video)
                times = block_times(store.plan, timestamps, CHUNKING.groups_per_block)
                n_blocks = len(times)
                random_count = SparseConfig.from_dict({"budget": 0.25}).dense_count(n_blocks)
                picks = rng.sample(range(1, n_blocks - 1), max(0, random_count - 2))
                trial = dict(settings, oracle={"budget": 1, "dense_times": [list(star)]},
                             random={"budget": 1, "dense_times": [list(times[b]) for b in picks]})
                middle = (star[0] + star[1]) / 2
                for name, cfg in trial.items():
                    for kind, question in shapes.QUESTIONS.items():
                        text, stats = answer(model, tok, store, timestamps, question, cfg)
                        hits[name][kind] += shapes.is_correct(text, video.answers[kind])
                        if kind == "needle":  # each question picks its own blocks: recall is the needle's
                            recall[name] += any(s <= middle <= e + 1 for s, e in stats["dense_blocks"])
                            kept[name] += stats["kept_share"]
                done += 1
                if time.time() - t0 > args.time_limit:
                    break
            for name in hits:
                row = {"seconds": seconds, "setting": name, "videos": done,
                       "acc": {k: round(100 * v / done, 1) for k, v in hits[name].items()},
                       "star_recall": round(100 * recall[name] / done, 1), "kept_share": round(kept[name] / done, 3)}
                rows.append(row)
                print(f"{seconds:5d}s {name:10s} n={done:3d} kept {row['kept_share']:.2f} recall "
                      f"{row['star_recall']:5.1f} " + " ".join(f"{k} {v:5.1f}" for k, v in row["acc"].items()),
                      flush=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "chunking": "mask 16/4", "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
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
