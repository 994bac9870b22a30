"""Why two GPUs' server workers are slower than one (issue 24): frame decoding on two GPUs from one process
against two processes.

    python bench/nvdec_contention.py --out nvdec_contention.json [--minutes 10] [--work /tmp/mg] [--tiny]

`videoxl serve --devices cuda:0,cuda:1` runs one worker thread per GPU in one process; on two H200s each took
about 10 s a 10-minute video against 5.8 s alone, while `videoxl batch` (a process per GPU) took 6.3 s. Frame
decoding is most of that time, so this times `open_video` (NVDEC, 600 frames of a 10-minute 1080p file):
  alone        one GPU, this process;
  alone16      the same on 16 of the cores (what a batch worker gets on a 32-core host);
  threads      cuda:0 and cuda:1 at once, one thread each, this process (as the server does);
  threads6     the same with 6 NVDEC sessions each instead of 12;
  processes    cuda:0 and cuda:1 at once, one process each (as batch does).
Each case decodes files it has not decoded before (all of them are in the page cache: written just before).
--same-gpu (issue 19): whether one process's decoding is bound by NVDEC or by the host: P processes on cuda:0 at
once, S sessions each, each decoding its own file, for (P, S) in --shapes (default 1x12 2x6 2x12 3x4 4x6);
the aggregate is the frames of all over the span from the first start to the last end.
--tiny: 320x240 files of a few seconds on the CPU decoder (a check of this script without a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def decode(path: str, device: str, frames: int, workers: int | None = None) -> dict:
    import torch

    from videoxl.video.sources import open_video

    t = time.perf_counter()
    stream = open_video(path, frames, 1, device=torch.device(device), workers=workers)
    n = sum(len(b) for b in stream.batches(64))
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return {"device": device, "file": os.path.basename(path), "frames": n, "wall_s": round(time.perf_counter() - t, 3),
            "decoder": stream.stats.get("video_decoder"), "workers": stream.stats.get("video_workers")}


def at_once(jobs: list[tuple]) -> dict:
    """Run decode(*job) for every job on its own thread; the wall clock of all and each one's result."""
    out: list = [None] * len(jobs)

    def one(i):
        out[i] = decode(*jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"wall_s": round(time.perf_counter() - t, 3), "each": out}


def in_processes(jobs: list[tuple], warm: str) -> dict:
    """One process per job, started together; each warms its decoder on `warm` first and reports its decode."""
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--one", path, device, str(frames), warm, *map(str, rest)],
                              stdout=subprocess.PIPE, env=env, text=True) for path, device, frames, *rest in jobs]
    each = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"wall_s_with_start": round(time.perf_counter() - t, 3), "each": each,
            "decode_span_s": round(max(e["end"] for e in each) - min(e["start"] for e in each), 3)}


def one_process(path: str, device: str, frames: int, warm: str, workers: int | None = None,
                start_at: float | None = None) -> None:
    decode(warm, device, 8)
    if start_at is not None:  # every process of a case starts decoding together, after its imports and warm-up
        time.sleep(max(0.0, start_at - time.time()))
    start = time.time()
    r = decode(path, device, frames, workers)
    print(json.dumps(dict(r, start=start, end=time.time())))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        extra = sys.argv[6:]
        one_process(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(extra[0]) if extra else None,
                    float(extra[1]) if len(extra) > 1 else None)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--work", default="/tmp/mg")
    ap.add_argument("--out", default="nvdec_contention.json")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--same-gpu", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=["1x12", "2x6", "2x12", "3x4", "4x6"])
    args = ap.parse_args()
    from multi_gpu import make_videos

    os.makedirs(args.work, exist_ok=True)
    size = (320, 240) if args.tiny else (1920, 1080)
    if args.same_gpu:  # a file per process of each case: none decoded twice
        files = make_videos(args.work, sum(int(s.split("x")[0]) for s in args.shapes),
                            0.2 if args.tiny else args.minutes, size, prefix="sg")
    else:
        files = make_videos(args.work, 8, 0.2 if args.tiny else args.minutes, size, prefix="nc")
    warm = make_videos(args.work, 1, 0, size, prefix="ncwarm")[0]
    frames = int((0.2 if args.tiny else args.minutes) * 60)
    devs = ["cpu", "cpu"] if args.tiny else ["cuda:0", "cuda:1"]
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": len(os.sched_getaffinity(0)),
               "files": [os.path.basename(f) for f in files]}

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if args.same_gpu:
        return same_gpu(args, files, warm, frames, devs[0], results, save)
    for d in devs:
        decode(warm, d, 8)  # NVDEC and CUDA set up on both GPUs before anything is timed
    results["alone"] = decode(files[0], devs[0], frames)
    save()
    cores = sorted(os.sched_getaffinity(0))
    half = cores[:max(1, len(cores) // 2)]
    r: dict = {}
    th = threading.Thread(target=lambda: (os.sched_setaffinity(0, half), r.update(decode(files[1], devs[0], frames))))
    th.start()
    th.join()
    results["alone16"] = dict(r, cores=len(half))
    save()
    results["threads"] = at_once([(files[2], devs[0], frames), (files[3], devs[1], frames)])
    save()
    results["threads6"] = at_once([(files[4], devs[0], frames, 6), (files[5], devs[1], frames, 6)])
    save()
    results["processes"] = in_processes([(files[6], devs[0], frames), (files[7], devs[1], frames)], warm)
    save()
    print(json.dumps(results, indent=1))
    return 0


def same_gpu(args, files, warm, frames, device, results, save) -> int:
    results["same_gpu"] = {}
    used = 0
    for shape in args.shapes:
        procs, sessions = map(int, shape.split("x"))
        mine, used = files[used:used + procs], used + procs
        start_at = time.time() + (8 if not args.tiny else 3)  # after every child's imports and warm-up
        r = in_processes([(f, device, frames, sessions, start_at) for f in mine], warm)
        r["frames"] = sum(e["frames"] for e in r["each"])
        r["frames_per_s"] = round(r["frames"] / r["decode_span_s"], 1)
        results["same_gpu"][shape] = r
        print(shape, json.dumps({k: r[k] for k in ("frames", "decode_span_s", "frames_per_s")}),
              [e["wall_s"] for e in r["each"]], flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
