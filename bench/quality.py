"""Answer quality of the shipped tiny model on held-out "shapes" videos, per question kind, length and prefill mode.

    python bench/quality.py [--model DIR] [--lengths 64 256 1024] [--videos 100] [--skip 0] [--files 4] [--json out.json]

Videos: `shapes.make_video(seed, length)` for seeds 100000.. (the held-out seed domain; training draws from
another), 320x240, noise 4, asked as the task says (`sample_fps=1`, `max_num_frames` = length). They go in as
1-fps frame lists resized to 384x384 the way the file path resizes (a 2-fps file sampled at 1 fps gives the same
frames and timestamps 0.0, 1.0, ...), which skips encoding and decoding. `--files N` also writes N real files
per length (mpeg4 and h264 alternately; 160x120 to 640x480; noise sigma 8) and asks through the file path.
Each video's prefix KV cache is reused across its 4 questions (same video, same settings), as `chat` does.

MODES is the hook: name -> function that sets the model's runtime switches. Two bi-level decoding modes are in
it (run them with `--modes`); more are one line each: `MODES["name"] = sparse("mask", 16, 4, budget)`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import videoxl  # noqa: E402
from videoxl.demo import shapes  # noqa: E402
from videoxl.cache.identity import VideoRef  # noqa: E402

HELDOUT_SEED = 100_000
GEN = {"do_sample": False, "max_new_tokens": 8}
FILE_SIZES = [(320, 240), (160, 120), (640, 480), (400, 300)]  # files: other sizes, noise sigma 8


def chunked(mode: str, chunk: int, step: int, offload: bool = False):
    def apply(model):
        model.config.enable_sparse = False
        model.config.enable_chunk_prefill = True
        model.config.prefill_config = {"chunk_prefill_mode": mode, "chunk_size": chunk, "step_size": step,
                                       "offload": offload, "chunk_size_for_vision_tower": 96}
    return apply


def sparse(mode: str, chunk: int, step: int, budget: float, compression: int = 4):
    """Bi-level KV decoding over a chunked prefill (the model card's enable_sparse)."""
    prefill = chunked(mode, chunk, step)

    def apply(model):
        prefill(model)
        model.config.enable_sparse = True
        model.config.sparse_config = {"budget": budget, "compression": compression}
    return apply


def dense(model):
    model.config.enable_chunk_prefill = False
    model.config.prefill_config = None
    model.config.enable_sparse = False


MODES = {"dense": dense,
         "mask 4/1": chunked("mask", 4, 1), "mask 16/4": chunked("mask", 16, 4),
         "streaming 4/1": chunked("streaming", 4, 1), "streaming 16/4": chunked("streaming", 16, 4),
         "streaming+offload 4/1": chunked("streaming", 4, 1, True),
         "streaming+offload 16/4": chunked("streaming", 16, 4, True)}
PREFILL_MODES = list(MODES)  # the default set
MODES.update({"sparse 16/4 budget 0.25": sparse("mask", 16, 4, 0.25),
              "sparse 4/1 budget 0.25": sparse("mask", 4, 1, 0.25)})  # bi-level decoding: --modes to run


def ask(model, tok, video, source, seconds: int) -> dict[str, bool]:
    out = {}
    for kind, question in shapes.QUESTIONS.items():
        answer = model.chat(source, tok, question, max_num_frames=seconds, sample_fps=1, max_sample_fps=None,
                            generation_config=GEN)
        out[kind] = shapes.is_correct(answer, video.answers[kind])
    return out


def run(args) -> dict:
    model, tok = videoxl.load(args.model, device=args.device, dtype=args.dtype)
    modes = {m: MODES[m] for m in args.modes}
    results, t_start = [], time.time()
    pool = ThreadPoolExecutor(6)
    render_device = "cuda" if torch.cuda.is_available() else "cpu"
    limits = dict(zip(args.lengths, args.time_limit * len(args.lengths) if len(args.time_limit) == 1
                      else args.time_limit))
    for seconds in args.lengths:
        seeds = [HELDOUT_SEED + args.skip + i for i in range(args.videos)]

        def prepare(seed, seconds=seconds):
            video = shapes.make_video(seed, seconds)
            return seed, video, shapes.model_frames(video, render_device)
        futures = [pool.submit(prepare, s) for s in seeds[:6]]  # the next videos are drawn while this one runs
        hits = {m: {k: 0 for k in shapes.KINDS} for m in modes}
        t0, done = time.time(), 0
        for i in range(len(seeds)):  # noqa: B007
            seed, video, frames = futures[i].result()
            if i + 6 < len(seeds):
                futures.append(pool.submit(prepare, seeds[i + 6]))
            # in-memory frames have no identity of their own: name them, so the 4 questions reuse the prefix
            source = VideoRef(f"shapes-{seconds}s-{seed}", tuple(frames))
            for name, apply in modes.items():
                apply(model)
                for kind, ok in ask(model, tok, video, source, seconds).items():
                    hits[name][kind] += ok
            done += 1
            if time.time() - t0 > limits[seconds]:
                break
        for name in modes if done else ():
            acc = {k: round(100 * hits[name][k] / done, 1) for k in shapes.KINDS}
            results.append({"seconds": seconds, "mode": name, "videos": done, "source": "frames", "acc": acc})
            print(f"{seconds:5d}s {name:24s} n={done:3d} " + " ".join(f"{k} {v:5.1f}" for k, v in acc.items()),
                  flush=True)
        print(f"  ({time.time() - t0:.0f}s for {seconds}-s videos)", flush=True)
        if args.files:
            results += files(model, tok, seconds, args.files, modes)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "model": os.path.abspath(args.model), "results": results,
            "seconds_total": round(time.time() - t_start)}


def files(model, tok, seconds: int, count: int, modes) -> list[dict]:
    """Real files: alternately mpeg4 and h264, sizes from FILE_SIZES, noise sigma 8, asked through the file path
    (decode + resize + sampling)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        hits = {m: {k: 0 for k in shapes.KINDS} for m in modes}
        for i in range(count):
            width, height = FILE_SIZES[i % len(FILE_SIZES)]
            video = shapes.make_video(HELDOUT_SEED + 50_000 + i, seconds, width, height, noise=8.0)
            codec = ("mpeg4", "libx264")[i % 2]
            path = shapes.write_video(video, os.path.join(tmp, f"{i}.mp4"), codec)
            for name, apply in modes.items():
                apply(model)
                for kind, ok in ask(model, tok, video, path, seconds).items():
                    hits[name][kind] += ok
        for name in modes:
            acc = {k: round(100 * hits[name][k] / count, 1) for k in shapes.KINDS}
            out.append({"seconds": seconds, "mode": name, "videos": count, "source": "files", "acc": acc})
            print(f"{seconds:5d}s {name:24s} n={count:3d} files " + " ".join(f"{k} {v:5.1f}" for k, v in acc.items()),
                  flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--skip", type=int, default=0, help="start at held-out video SKIP (to finish a sample in parts)")
    ap.add_argument("--files", type=int, default=0, help="real mpeg4/h264 files per length, besides frame lists")
    ap.add_argument("--modes", nargs="+", default=PREFILL_MODES, choices=list(MODES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--time-limit", type=float, nargs="+", default=[1e9],
                    help="seconds per length (one value, or one per length): stop adding videos after this")
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
