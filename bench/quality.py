"""Answer quality of the demo model on held-out "shapes" videos (version 2), per question kind, length and mode.

    python bench/quality.py [--model DIR] [--lengths 64 256 1024] [--videos 100] [--json out.json] [--quick]
                            [--quantize int8|int4|fp8] [--kv-dtype fp8]

Modes: dense; chunked prefill mask 16/4 and 4/1; streaming + offload 16/4; bi-level decoding over a mask 16/4
prefill at budgets 10/25/50 % x compression 4/16 with the dense blocks chosen in-model, at random and by an
oracle (bench/quality_bilevel.py says how). Every row has a per-kind table and the share of KVs kept; the JSON
goes to bench/results/ (unless --json) and `bench/plot_quality.py` draws accuracy against the share kept.
`--quick`: a CPU smoke test (2 videos of 64 s, one bi-level setting per way of choosing).

Videos: `shapes.make_video(seed, length)` for seeds 100000.. (the held-out seed domain; training draws from
another), 320x240, noise 4, asked as the task says (`sample_fps=1`, `max_num_frames` = length). They go in as
1-fps frame lists resized to 384x384 the way the file path resizes (a 2-fps file sampled at 1 fps gives the same
frames and timestamps 0.0, 1.0, ...), which skips encoding and decoding. `--files N` also writes N real files
per length (mpeg4 and h264 alternately; 160x120 to 640x480; noise sigma 8) and asks through the file path.
Each video's prefix KV cache is reused across its 4 questions (same video, same settings), as `chat` does.

MODES is the hook for modes that run through `chat`: name -> function that sets the model's runtime switches
(quantized and live modes go there as they land); the bi-level grid runs through quality_bilevel.ask_grid on the
same videos, prefilled once each.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import videoxl  # noqa: E402
from videoxl.demo import shapes  # noqa: E402
from videoxl.cache.identity import VideoRef  # noqa: E402
from quality_bilevel import SELECTS, Tally, ask_grid, grid, print_table  # noqa: E402

HELDOUT_SEED = 100_000
GEN = {"do_sample": False, "max_new_tokens": 4}  # the longest answer word, 'ring', is 3 tokens
FILE_SIZES = [(320, 240), (160, 120), (640, 480), (400, 300)]  # files: other sizes, noise sigma 8


def chunked(mode: str, chunk: int, step: int, offload: bool = False):
    def apply(model):
        model.config.enable_sparse = False
        model.config.enable_chunk_prefill = True
        model.config.prefill_config = {"chunk_prefill_mode": mode, "chunk_size": chunk, "step_size": step,
                                       "offload": offload, "chunk_size_for_vision_tower": 96}
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
DEFAULT_MODES = ["dense", "mask 16/4", "mask 4/1", "streaming+offload 16/4"]  # the list


def ask(model, tok, video, source, seconds: int) -> dict[str, bool]:
    out = {}
    for kind, question in video.questions.items():
        answer = model.chat(source, tok, question, max_num_frames=seconds, sample_fps=1, max_sample_fps=None,
                            generation_config=GEN)
        out[kind] = shapes.is_correct(answer, video.answers[kind])
    return out


def run(args) -> dict:
    model, tok = videoxl.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                              kv_dtype=args.kv_dtype)
    modes = {m: MODES[m] for m in args.modes}
    settings = grid(args.budgets, args.compressions, args.selects)
    meta = {m: {"kind_of_mode": "prefill"} for m in modes} | {n: {"kind_of_mode": "bi-level", **s}
                                                               for n, s in settings.items()}
    results, t_start = [], time.time()
    pool = ThreadPoolExecutor(4)
    render_device = "cuda" if torch.cuda.is_available() else "cpu"
    limits = dict(zip(args.lengths, args.time_limit * len(args.lengths) if len(args.time_limit) == 1
                      else args.time_limit))
    for seconds in args.lengths:
        seeds = [HELDOUT_SEED + args.skip + i for i in range(args.videos)]

        def prepare(seed, seconds=seconds):
            video = shapes.make_video(seed, seconds)
            return seed, video, shapes.model_frames(video, render_device)
        futures = [pool.submit(prepare, s) for s in seeds[:4]]  # the next videos are drawn while this one runs
        tally, t0 = Tally(), time.time()
        for i in range(len(seeds)):
            seed, video, frames = futures[i].result()
            if i + 4 < len(seeds):
                futures.append(pool.submit(prepare, seeds[i + 4]))
            # in-memory frames have no identity of their own: name them, so the questions reuse the prefix
            source = VideoRef(f"shapes-v2-{seconds}s-{seed}", tuple(frames))
            for name, apply in modes.items():
                apply(model)
                tally.add(name, ask(model, tok, video, source, seconds))
            if settings:
                dense(model)
                with torch.inference_mode():
                    for name, (right, kept) in ask_grid(model, tok, video, frames, settings).items():
                        tally.add(name, right, kept)
            if time.time() - t0 > limits[seconds]:
                break
        results += tally.rows(seconds, meta)
        print(f"  ({time.time() - t0:.0f}s for {seconds}-s videos)", flush=True)
        if args.files:
            results += files(model, tok, seconds, args.files, modes, meta)
    print_table(results)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "quantize": args.quantize, "kv_dtype": args.kv_dtype,
            "torch": torch.__version__, "model": os.path.abspath(args.model), "task": "shapes v2",
            "heldout_seeds": f"{HELDOUT_SEED + args.skip}..", "results": results,
            "seconds_total": round(time.time() - t_start)}


def files(model, tok, seconds: int, count: int, modes, meta) -> list[dict]:
    """Real files: alternately mpeg4 and h264, sizes from FILE_SIZES, noise sigma 8, asked through the file path
    (decode + resize + sampling), in the `chat` modes."""
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            width, height = FILE_SIZES[i % len(FILE_SIZES)]
            video = shapes.make_video(HELDOUT_SEED + 50_000 + i, seconds, width, height, noise=8.0)
            path = shapes.write_video(video, os.path.join(tmp, f"{i}.mp4"), ("mpeg4", "libx264")[i % 2])
            for name, apply in modes.items():
                apply(model)
                tally.add(name, ask(model, tok, video, path, seconds))
    return [dict(r, source="files") for r in tally.rows(seconds, meta)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--skip", type=int, default=0, help="start at held-out video SKIP (to finish a sample in parts)")
    ap.add_argument("--files", type=int, default=0, help="real mpeg4/h264 files per length, besides frame lists")
    ap.add_argument("--modes", nargs="*", default=DEFAULT_MODES, choices=list(MODES))
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.1, 0.25, 0.5], help="bi-level budgets")
    ap.add_argument("--compressions", type=int, nargs="*", default=[4, 16])
    ap.add_argument("--selects", nargs="*", default=list(SELECTS), choices=SELECTS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", default=None, choices=["int8", "int4", "fp8"], help="the decoder layers' weights")
    ap.add_argument("--kv-dtype", default=None, choices=["fp8"], help="the KV cache (language/kv_fp8.py)")
    ap.add_argument("--time-limit", type=float, nargs="+", default=[1e9],
                    help="seconds per length (one value, or one per length): stop adding videos after this")
    ap.add_argument("--json", default=None, help="default: bench/results/quality_v2-DEVICE-DATE.json")
    ap.add_argument("--plot", default=None, help="also draw the plot here (PNG)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: 2 videos of 64 s, one setting a way")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.videos, args.budgets, args.compressions = [64], 2, [0.25], [4]
        args.device, args.dtype = args.device or "cpu", args.dtype or "float32"
    args.model = args.model or videoxl.demo_model_path()
    report = run(args)
    where = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality_v2-{}-{}.json"
                                      .format(report["device"].replace(" ", "_"), report["date"][:10]))
    with open(where, "w") as f:
        json.dump(report, f, indent=1)
    print(f"results: {where}")
    if args.plot:
        from plot_quality import plot
        plot([report], args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
