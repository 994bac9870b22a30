"""Live video on the full-size architecture (random bf16 weights): ingest throughput, first-token latency of
questions asked while the video grows, and GPU memory over time.

    python bench/live.py --minutes 60 --checkpoints 10 30 60 --modes dense bilevel \\
        [--source camera_1h_1080p.ts] --out bench/results/live-h200.json --plot bench/live.png

modes:
  dense    dense (causal) prefill, KVs on the GPU, dense decoding
  bilevel  streaming 16/4 with offload (KVs in pinned CPU memory), bi-level decoding (25 % of blocks dense)
Frames at 1 fps: with --source FILE the session's own reader follows the file (PyAV decoding on the CPU, frame
threads, overlapped with vision and prefill), as fast as it goes; without it, synthetic 1080p frames (a noise
image shifted every frame) are appended as fast as they are made, and frame decoding is not in the figures
(the JSON says which). When the video reaches each checkpoint a question is asked (the ingest goes on beside it):
The JSON's memory samples carry the estimate (videoxl.memory.live_estimate) beside the measured allocation;
`ttft_s` is the model's first-token time from the start of the question, `ttft_wall_s` includes waiting for the
group being prefilled. `--tiny` runs the same on the tiny config (CPU smoke test: its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from prefill import random_model  # noqa: E402  (bench/prefill.py: the full-size model, random bf16 weights)

from videoxl.checkpoint.tiny import make_tokenizer  # noqa: E402
from videoxl.memory import live_estimate, mode_of  # noqa: E402

MODES = {
    "dense": {"enable_chunk_prefill": False},
    "bilevel": {"prefill_config": {"chunk_prefill_mode": "streaming", "chunk_size": 16, "step_size": 4,
                                   "offload": True, "chunk_size_for_vision_tower": 96},
                "sparse_config": {"budget": 0.25}},
}
QUESTION = "What happened in the last minute?"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def gpu_gb(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_gb": round(torch.cuda.memory_allocated(device) / 2**30, 3),
            "reserved_gb": round(torch.cuda.memory_reserved(device) / 2**30, 3)}


class SyntheticFeed(threading.Thread):
    """1080p frames at 1 fps: a fixed noise image rolled a few pixels per frame (content the resize and the
    vision tower cannot shortcut), appended in batches as fast as they are made."""

    def __init__(self, session, seconds: int, size=(1080, 1920), batch: int = 32):
        super().__init__(daemon=True)
        self.session, self.seconds, self.batch = session, seconds, batch
        self.base = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
        self.error = None
        self.done = threading.Event()

    def run(self):
        try:
            for start in range(0, self.seconds, self.batch):
                n = min(self.batch, self.seconds - start)
                frames = np.stack([np.roll(self.base, 7 * (start + k), axis=1) for k in range(n)])
                self.session.append(frames, [float(start + k) for k in range(n)])
        except Exception as e:
            self.error = repr(e)
        finally:
            self.done.set()


def run_mode(model, tok, mode: str, args, save=lambda partial: None) -> dict:
    """One session fed to --minutes; `save(partial)` after each question and memory sample, so a run stopped by
    a time limit still leaves what it measured."""
    total = int(args.minutes * 60)
    session = model.open_live(tok, sample_fps=1.0, **MODES[mode])
    if args.source:
        reader = session.append_source(args.source)
        finished = lambda: reader.ended or session.stats["frames"] >= total  # noqa: E731
    else:
        feed = SyntheticFeed(session, total)
        feed.start()
        finished = feed.done.is_set
    checkpoints = sorted(int(m * 60) for m in args.checkpoints)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    memory, questions, t_start = [], [], time.perf_counter()
    next_sample = 0
    gen = {"max_new_tokens": args.answer_tokens}
    while True:
        stats = session.stats
        frames = stats["frames"]
        if frames >= next_sample:
            sparse = MODES[mode].get("sparse_config")
            est = live_estimate(model.config, frames, mode_of(session.chunking), weights, session.per_slice,
                                model.dtype.itemsize,
                                (sparse["budget"], sparse.get("compression", 4)) if sparse else None,
                                model.decoder.kv_dtype)
            memory.append({"video_s": frames, "wall_s": round(time.perf_counter() - t_start, 2),
                           "kv_tokens": stats["kv_tokens"], "estimate_gb": round(est.total / 2**30, 3),
                           **gpu_gb(model.device)})
            next_sample = frames + args.sample_every
            save({"mode": mode, "partial": True, "video_s": frames, "questions": questions, "memory": memory})
        if checkpoints and frames >= checkpoints[0]:
            at = checkpoints.pop(0)
            t0 = time.perf_counter()
            pieces = session.stream_ask(QUESTION, gen)
            next(pieces, None)
            first = time.perf_counter() - t0
            for _ in pieces:
                pass
            last = session.last_stats
            questions.append({"at_min": at / 60, "covered_s": last["covers_s"], "ttft_s": last.get("ttft_s"),
                              "ttft_wall_s": round(first, 3), "kv_tokens": last["kv_tokens"],
                              "dense_blocks": len(last.get("dense_blocks", [])) or None, **gpu_gb(model.device)})
            log(f"{mode}: question at {at / 60:g} min: first token {last.get('ttft_s')} s "
                f"(wall {first:.3f} s), {last['kv_tokens']} KV tokens")
            save({"mode": mode, "partial": True, "video_s": frames, "questions": questions, "memory": memory})
        if finished() and not checkpoints:
            break
        if finished() and frames < checkpoints[0]:
            log(f"{mode}: the video ended at {frames} s, before the {checkpoints[0] / 60:g} min checkpoint")
            break
        time.sleep(0.02)
    wall = time.perf_counter() - t_start
    stats = session.stats
    session.close()
    error = (reader.error if args.source else feed.error)
    out = {"mode": mode, "settings": MODES[mode], "video_s": stats["frames"], "wall_s": round(wall, 2),
           "realtime_x": round(stats["frames"] / wall, 2), "ingest": stats["ingest"], "questions": questions,
           "memory": memory, "error": error,
           "frames_from": f"file {args.source} (PyAV CPU decoding)" if args.source else
           "synthetic 1080p arrays (no decoding)"}
    if model.device.type == "cuda":
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(model.device) / 2**30, 2)
    log(f"{mode}: {stats['frames']} s of video in {wall:.1f} s = {out['realtime_x']}x real time; "
        f"ingest {stats['ingest']}")
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in results["runs"]:
        pts = [(m["video_s"] / 60, m.get("allocated_gb")) for m in run["memory"] if "allocated_gb" in m]
        if pts:
            line, = ax.plot(*zip(*pts), label=f"{run['mode']} ({run.get('realtime_x', 'stopped early: ?')}x real time)")
            ax.plot([m["video_s"] / 60 for m in run["memory"]], [m["estimate_gb"] for m in run["memory"]], "--",
                    color=line.get_color(), lw=1, label=f"{run['mode']}, estimate (videoxl.memory)")
        for q in run["questions"]:
            if "allocated_gb" in q:
                ax.plot(q["at_min"], q["allocated_gb"], "k.", ms=4)
    ax.set_xlabel("video appended (minutes at 1 fps)")
    ax.set_ylabel("GPU memory allocated (GiB)")
    ax.set_title(f"live session, {results['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--checkpoints", type=float, nargs="*", default=[10, 30, 60])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--source", default=None, help="a video file to follow (default: synthetic 1080p frames)")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--sample-every", type=int, default=30, help="memory sample every this many video seconds")
    ap.add_argument("--tiny", action="store_true", help="the tiny config (a CPU smoke test of this script)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model = random_model(device, tiny=args.tiny)
    tok = make_tokenizer(tempfile.mkdtemp())
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny, "minutes": args.minutes, "runs": []}
    def save(partial=None):
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(dict(results, runs=results["runs"] + ([partial] if partial else [])), f, indent=1)
            os.replace(args.out + ".tmp", args.out)

    for mode in args.modes:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        results["runs"].append(run_mode(model, tok, mode, args, save))
    save()
    if args.out:
        log(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
