"""Answer quality of the shipped demo model on live "shapes" streams: questions asked at random moments.

    python bench/live_quality.py [--videos 40] [--seconds 128] [--moments 4] [--mode dense|mask|streaming]
                                 [--device cpu] [--json bench/results/live_quality.json]

Each held-out video (`shapes.make_video(seed, seconds)`, seeds 200000..) is played into one live session; at
`--moments` random times (sorted, anywhere, mid-group too) the frames up to then are appended and one of the task's
questions is asked, chosen at random among those with an answer over what has been shown. The truth is the task's
answer over the frames in whole groups when asked (videoxl/live/demo.truth_at): "the shape at the end" is the
current one. Reported per question kind, and apart for "last" asked within 4 s of a scene change (training
never ended a video there: its last scene lasts at least 4 s).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import videoxl  # noqa: E402
from videoxl.demo import shapes  # noqa: E402
from videoxl.live.demo import seconds_of, truth_at  # noqa: E402

HELDOUT_SEED = 200_000
GEN = {"do_sample": False, "max_new_tokens": 8}
MODES = {"dense": {"enable_chunk_prefill": False},
         "mask": {"prefill_config": {"chunk_prefill_mode": "mask", "chunk_size": 4, "step_size": 1}},
         "streaming": {"prefill_config": {"chunk_prefill_mode": "streaming", "chunk_size": 4, "step_size": 1}}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the shipped demo model")
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--seconds", type=int, default=128)
    ap.add_argument("--moments", type=int, default=4, help="questions per video")
    ap.add_argument("--mode", choices=list(MODES), default="dense")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the moments and question choices")
    ap.add_argument("--version", type=int, default=1, choices=[1, 2],
                    help="shapes version: 1 (four kinds), 2 (+ digit, count, time; needs weights trained on it)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = videoxl.load(args.model or videoxl.demo_model_path(), device=args.device)
    rng = random.Random(args.seed)
    by_kind, rows, t0 = defaultdict(lambda: [0, 0]), [], time.perf_counter()
    for v in range(args.videos):
        video = shapes.make_video(HELDOUT_SEED + v, args.seconds, version=args.version)
        frames = seconds_of(video, 0, args.seconds)
        moments = sorted(rng.sample(range(4, args.seconds + 1), args.moments))
        with model.open_live(tok, sample_fps=1.0, **MODES[args.mode]) as live:
            shown = 0
            for moment in moments:
                live.append(frames[shown:moment], [float(t) for t in range(shown, moment)])
                shown = moment
                covered = live.stats["frames"]
                truth = truth_at(video, covered)
                kind = rng.choice([k for k, answer in truth.items() if answer is not None])
                answer = live.ask(video.questions[kind], GEN)
                ok = shapes.is_correct(answer, truth[kind])
                scene = next(s for s in video.scenes if s.start < covered <= s.end)
                key = "last (scene begun < 4 s before)" if kind == "last" and covered - scene.start < 4 else kind
                by_kind[key][0] += ok
                by_kind[key][1] += 1
                rows.append({"video": HELDOUT_SEED + v, "shown_s": moment, "covered_s": covered, "kind": kind,
                             "expected": truth[kind], "answer": answer.strip(), "ok": ok})
        done = sum(n for _, n in by_kind.values())
        print(f"video {v + 1}/{args.videos}: {sum(r for r, _ in by_kind.values())}/{done} right "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    summary = {k: {"right": r, "asked": n, "accuracy": round(r / n, 4)} for k, (r, n) in sorted(by_kind.items())}
    for k, s in summary.items():
        print(f"{k:36s} {s['right']:4d}/{s['asked']:<4d} {100 * s['accuracy']:.1f} %")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": str(model.device), "mode": args.mode,
                       "version": args.version,
                       "seconds": args.seconds, "videos": args.videos, "summary": summary, "questions": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
