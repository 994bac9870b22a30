"""`videoxl batch` on one device against several: rows per second, and whether every backend answers alike.

    python bench/batch.py --videos 16 --seconds 256 --devices cuda:0 cuda:0,cuda:1 [--out batch.json]

The shipped tiny demo model on held-out "shapes" task files (h264, 320x240, the task's 2 fps), its four
questions per video, asked as the task says (`sample_fps=1`, `max_num_frames` = length). Each device setting
runs `videoxl batch` as a user would (a new process, model loads included) into its own output file; the table
gives wall time, rows/s, accuracy against the task's answers, and whether the answers equal the first
setting's. With the tiny model the time is mostly frame decoding and process start-up, not the GPU: this
measures the batch machinery (spreading videos over workers), not the full-size model's throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from videoxl.demo import shapes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=256)
    ap.add_argument("--devices", nargs="+", default=["cuda:0", "cuda:0,cuda:1"])
    ap.add_argument("--out", default="batch.json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="batch-bench-")
    expected, rows = {}, []
    t0 = time.perf_counter()
    for i in range(args.videos):
        video = shapes.make_video(400_000 + i, args.seconds)
        shapes.write_video(video, os.path.join(work, f"v{i}.mp4"), "libx264")
        for kind, question in shapes.QUESTIONS.items():
            rows.append({"id": f"v{i}-{kind}", "video": f"v{i}.mp4", "question": question})
            expected[f"v{i}-{kind}"] = video.answers[kind]
    with open(os.path.join(work, "in.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{args.videos} videos of {args.seconds} s written in {time.perf_counter() - t0:.1f} s", flush=True)
    runs, first = [], None
    for devices in args.devices:
        out = os.path.join(work, f"out-{devices.replace(',', '_').replace(':', '')}.jsonl")
        cmd = [sys.executable, "-m", "videoxl.cli.main", "batch", os.path.join(work, "in.jsonl"), "-o", out, "--demo",
               "--devices", devices, "--max-num-frames", str(args.seconds), "--max-new-tokens", "8"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        with open(out) as f:
            got = {r["id"]: r.get("answer") for r in map(json.loads, f)}
        first = first or got
        right = sum(shapes.is_correct(got.get(k) or "", v) for k, v in expected.items())
        runs.append({"devices": devices, "rc": proc.returncode, "wall_s": round(wall, 1),
                     "rows_per_s": round(len(rows) / wall, 2), "accuracy": round(100 * right / len(rows), 1),
                     "same_as_first": got == first, "stderr_tail": proc.stderr.strip().splitlines()[-3:],
                     "stderr_errors": [line for line in proc.stderr.splitlines() if "Error" in line][:6]})
        print(runs[-1], flush=True)
    import torch

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "videos": args.videos,
              "seconds": args.seconds, "rows": len(rows),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gpus": torch.cuda.device_count(), "runs": runs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']} x{result['gpus']}: {len(rows)} rows ({args.videos} videos of {args.seconds} s)")
    for r in runs:
        print(f"{r['devices']:>16} rc {r['rc']} wall {r['wall_s']:7.1f} s  {r['rows_per_s']:6.2f} rows/s  "
              f"accuracy {r['accuracy']:5.1f}%  same answers: {r['same_as_first']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
