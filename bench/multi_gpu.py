"""`videoxl batch` and `videoxl serve` on one GPU against two (issue 24), full-size model with random bf16 weights.

    python bench/multi_gpu.py --out bench/results/multi_gpu.json [--videos 8] [--minutes 5] [--questions 4]
        [--clients 16] [--serve-questions 2] [--tokens 16] [--parts batch,serve] [--budget-s 340]
        [--wheels .gpu/wheels_serve] [--work /tmp/videoxl-multi-gpu] [--tiny]

1. A full-size checkpoint folder of random weights (bench/prefill.py random_checkpoint), written once into --work.
2. N 1080p H.264 files: a 10-s testsrc2 chunk encoded once, its packets repeated; file i is i chunks longer than
   `--minutes` so every file has its own bytes (its own content id: no KV cache hit across files) and its own
   time tokens (the untimed warm-up files are shorter than all of them). Questions name their video and their
   number, so every (video, question) answer is its own.
3. batch: `videoxl batch` in a new process per setting (`cuda:0`, then `cuda:0,cuda:1`), model loads included;
   rows/s, and whether the answers equal the first setting's. `--ray local` too when Ray is installed (it is not
   on the lent GPU hosts, and its wheel is too large to carry: the run says it skipped it).
4. serve: `videoxl serve --devices D` in a new process; once /health answers, C client threads take the N x Q
   requests (every video's first question, then every video's second, ...) over plain HTTP (urllib: no client
   library needed); requests/s over the clients' span (start-up reported apart), failures, answers against the
   first setting's (a mixed answer differs), and the server's per-device metrics.
The whole run stops at --budget-s: a part that would start past it is skipped, a command still running at it is
killed, and what finished is in --out (written after every step). Without fastapi/uvicorn installed, --wheels
names a folder of their wheels, unpacked into --work/site for the server's process (pure Python + pydantic_core).
--tiny: the tiny random model, 320x240 files of a few seconds, devices cpu and cpu,cpu (a check on a CPU).

Expected on an H200 x2 with the defaults (estimates from bench/RESULTS.md's 10.6 s file -> first token for a
10-min 1080p file with NVDEC, not measurements): checkpoint 30-60 s (once per machine: kept in --work), files
~15 s, batch warm-up ~20 s, batch 1 GPU ~70 s and 2 GPUs ~45 s (model loads ~15-20 s each included), serve
1 GPU ~70 s and 2 GPUs ~45 s (start-up included): ~5.5 min, inside the 340-s budget. The issue's own size
(`--minutes 10`) doubles the question time: run it as two calls, `--parts batch` then `--parts serve`, each
with `--budget-s 540`, on the same warm machine (the second reuses the checkpoint and files).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import time
import zipfile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from multi_gpu_serve import Budget, question, run_command, save, serve, speedup, tail  # noqa: E402
from prefill import log, random_checkpoint  # noqa: E402
from video_decode import encode_chunk, repeat  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHUNK_S = 10
ROW_STATS = ("ttft_s", "vision_s", "prefill_s", "video_decode_s", "video_decoder", "kv_cache")  # per answered row


def make_videos(work: str, n: int, minutes: float, size: tuple[int, int], prefix: str = "v",
                least: int = 1) -> list[str]:
    """`n` files, file i of `minutes` (at least `least` chunks) plus i chunks: no two alike."""
    w, h = size
    chunk = os.path.join(work, f"chunk-{w}x{h}-{CHUNK_S}s.mp4")
    if not os.path.exists(chunk):
        encode_chunk(chunk + ".tmp.mp4", w, h, CHUNK_S)
        os.replace(chunk + ".tmp.mp4", chunk)
    paths = []
    for i in range(n):
        copies = max(least, round(minutes * 60 / CHUNK_S)) + i
        path = os.path.join(work, f"{prefix}{i}-{w}x{h}-{copies * CHUNK_S}s.mp4")
        if not os.path.exists(path):
            repeat(chunk, path + ".tmp.mp4", copies, CHUNK_S * 30)
            os.replace(path + ".tmp.mp4", path)
        paths.append(path)
    return paths


# ---- batch ------------------------------------------------------------------------------------------------
def batch(args, ckpt, videos, env, budget, results) -> None:
    rows = [{"id": f"v{i}-q{q}", "video": v, "question": question(i, q)}
            for i, v in enumerate(videos) for q in range(args.questions)]
    jsonl = os.path.join(args.work, "batch-in.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if not args.no_warmup:  # kernels compiled once into the on-disk caches, so no setting pays for the others
        with open(jsonl + ".warm", "w") as f:
            f.write(json.dumps({"id": "warm", "video": args.warm[0], "question": question(0, 0)}) + "\n")
        out = os.path.join(args.work, "batch-warm.jsonl")
        if os.path.exists(out):
            os.remove(out)
        rc, wall = run_command([sys.executable, "-m", "videoxl.cli.main", "batch", jsonl + ".warm", "-o", out,
                                "--model", ckpt, "--devices", args.devices[0].split(",")[0], "--max-new-tokens",
                                str(args.tokens)], env, budget, out + ".log")
        results["batch"]["warmup"] = {"rc": rc, "wall_s": round(wall, 2)}
    first = None
    for setting in [*args.devices, "ray"]:
        if setting == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                results["batch"]["ray"] = {"skipped": "Ray is not installed here (nor carried: its wheel is too large)"}
                continue
        if budget.left() < 5:
            results["batch"][setting] = {"skipped": "out of the run's time budget"}
            continue
        out = os.path.join(args.work, f"batch-out-{setting.replace(',', '_').replace(':', '')}.jsonl")
        if os.path.exists(out):
            os.remove(out)  # batch resumes from its output: a rerun must answer everything again
        place = ["--ray", "local", "--workers", str(len(args.devices[-1].split(",")))] if setting == "ray" \
            else ["--devices", setting]
        cmd = [sys.executable, "-m", "videoxl.cli.main", "batch", jsonl, "-o", out, "--model", ckpt, *place,
               "--max-num-frames", str(args.frames), "--sample-fps", "1", "--max-new-tokens", str(args.tokens)]
        log(f"batch on {setting}: {len(rows)} rows")
        rc, wall = run_command(cmd, env, budget, out + ".log")
        got, by_device = {}, {}
        if os.path.exists(out):
            with open(out) as f:
                records = list(map(json.loads, f))
            got = {r["id"]: r.get("answer") for r in records}
            for r in records:  # which worker answered what, and how fast (a late worker takes fewer videos)
                s = r.get("stats") or {}
                d = by_device.setdefault(str(s.get("device")), {"rows": 0, **{k: [] for k in ROW_STATS}})
                d["rows"] += 1
                for k in ROW_STATS:
                    d[k].append(s.get(k))
        answered = sum(a is not None for a in got.values())
        first = first if first is not None else got
        results["batch"][setting] = {
            "rc": rc, "killed_at_budget": rc is None, "wall_s": round(wall, 2), "rows": len(rows),
            "answered": answered, "rows_per_s": round(answered / wall, 3),
            "same_answers_as_first": sum(got.get(k) == first.get(k) is not None for k in got),
            "by_device": by_device, "stderr_tail": tail(out + ".log", 40)}
        log(f"batch on {setting}: {results['batch'][setting]}")
        save(args.out, results)
    speedup(results["batch"], args.devices, "rows_per_s")


# ---- the run -----------------------------------------------------------------------------------------------
def server_env(args, env: dict) -> dict | None:
    """The environment in which `videoxl serve` can import fastapi and uvicorn (None: it cannot)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        return env
    except ImportError:
        pass
    wheels = sorted(glob.glob(os.path.join(args.wheels or "", "*.whl"))) if args.wheels else []
    if not wheels:
        return None
    site = os.path.join(args.work, "site")
    for wheel in wheels:  # a wheel is a zip of its import tree: unpacked, it is importable from `site`
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    return dict(env, PYTHONPATH=site + os.pathsep + env["PYTHONPATH"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=5.0, help="each file's length (file i: i x 10 s longer)")
    ap.add_argument("--questions", type=int, default=4, help="batch rows per video")
    ap.add_argument("--clients", type=int, default=16, help="concurrent serve clients")
    ap.add_argument("--serve-questions", type=int, default=2, help="serve requests per video")
    ap.add_argument("--tokens", type=int, default=16, help="answer tokens (random weights: always all of them)")
    ap.add_argument("--parts", default="batch,serve")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cuda:0 cuda:0,cuda:1 (--tiny: cpu cpu,cpu)")
    ap.add_argument("--budget-s", type=float, default=340, help="hard wall-clock limit of the whole run")
    ap.add_argument("--wheels", default=os.path.join(ROOT, ".gpu", "wheels_serve"))
    ap.add_argument("--work", default="/tmp/videoxl-multi-gpu", help="checkpoint and videos, kept for reruns")
    ap.add_argument("--out", default="multi_gpu.json")
    ap.add_argument("--no-warmup", action="store_true", help="no untimed first question per worker")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: the finally blocks end children
    args.devices = args.devices or (["cpu", "cpu,cpu"] if args.tiny else ["cuda:0", "cuda:0,cuda:1"])
    args.frames = max(1, int(args.minutes * 60))  # 1 frame a second, the longest file's extra seconds aside
    args.work = os.path.abspath(args.work)
    os.makedirs(args.work, exist_ok=True)
    import torch

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "gpus": torch.cuda.device_count(), "args": {k: v for k, v in vars(args).items()},
               "batch": {}, "serve": {}}
    t = time.perf_counter()
    ckpt = random_checkpoint(os.path.join(args.work, "tiny-ckpt" if args.tiny else "full-size-ckpt"), args.tiny)
    results["checkpoint_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    size = (320, 240) if args.tiny else (1920, 1080)
    warm = max(len(d.split(",")) for d in args.devices)  # warm-up files: 1, 2, ... chunks; the timed ones longer
    videos = make_videos(args.work, args.videos, args.minutes, size, least=warm + 1)  # (a file alike is a KV hit)
    results["videos_s"] = round(time.perf_counter() - t, 1)
    args.warm = make_videos(args.work, warm, 0, size, prefix="warm")
    log(f"checkpoint {results['checkpoint_s']} s, {len(videos)} videos {results['videos_s']} s")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parts = args.parts.split(",")
    if "batch" in parts:
        batch(args, ckpt, videos, env, budget, results)
    if "serve" in parts:
        senv = server_env(args, env)
        if senv is None:
            results["serve"] = {"skipped": f"fastapi/uvicorn not installed and no wheels in {args.wheels}"}
        else:
            serve(args, ckpt, videos, senv, budget, results)
    results["wall_s"] = round(args.budget_s - budget.left(), 1)
    save(args.out, results)
    print(json.dumps({p: {d: {k: v for k, v in r.items() if k in ("wall_s", "rows_per_s", "requests_per_s",
                                                                  "speedup_vs_first", "mixed", "failed", "skipped",
                                                                  "same_answers_as_first", "startup_s")}
                          for d, r in results[p].items() if isinstance(r, dict)}
                      for p in ("batch", "serve") if isinstance(results[p], dict)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
