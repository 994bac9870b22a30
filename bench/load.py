"""Checkpoint loading on the GPU (issue 19's cold start, issue 24's start-up): the full-size folder, alone and
beside the first video's NVDEC decoding, with our reader (checkpoint/read.py: positioned reads into pinned
buffers, copies on a stream of the thread's own) against safetensors' (memory-mapped tensors copied with .to()).

    python bench/load.py --out load.json [--work /tmp/mg] [--minutes 10] [--device cuda:0] [--tiny]

Cases (page cache warm unless said):
  decode_alone        open_video on a 10-minute 1080p file, NVDEC, nothing beside it;
  staged / safe_open  the weights to the GPU, nothing beside (staged: `load_model`, model built too);
  staged_cold         the same after the folder's pages were dropped: the disk's speed;
  *_beside_decode     the load with the decoding on a thread beside it, each one's time (what `videoxl chat`
                      and a batch worker do with their first video).
--tiny: the tiny checkpoint and 320x240 files on the CPU (a check of this script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nvdec_contention import decode  # noqa: E402
from serve_cache import drop_page_cache  # noqa: E402


def load_staged(folder: str, device: str, dtype) -> dict:
    from videoxl.checkpoint.loader import load_model

    model = load_model(folder, torch.device(device), dtype)
    return {"tensors": len(model.state_dict())}


def load_safe_open(folder: str, device: str, dtype) -> dict:
    """The reader before this change: one thread per shard, each tensor out of the memory map and `.to()` the
    GPU on a stream of the thread's own (weights only: no model built)."""
    from safetensors import safe_open

    from videoxl.checkpoint.loader import weight_files

    state: dict = {}

    def read(path):
        cuda = device.startswith("cuda")
        stream = torch.cuda.Stream(device) if cuda else None
        with safe_open(path, framework="pt", device="cpu") as f:
            with torch.cuda.stream(stream) if cuda else torch.device("cpu"):
                for name in f.keys():
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        if cuda:
            stream.synchronize()

    files = list(weight_files(folder))
    with ThreadPoolExecutor(len(files)) as pool:
        list(pool.map(read, files))
    return {"tensors": len(state)}


def timed(fn, *a) -> dict:
    t = time.perf_counter()
    r = fn(*a)
    return dict(r, wall_s=round(time.perf_counter() - t, 3))


def beside(load, folder, device, dtype, video, frames) -> dict:
    got: dict = {}
    th = threading.Thread(target=lambda: got.update(decode(video, device, frames)))
    t = time.perf_counter()
    th.start()
    r = timed(load, folder, device, dtype)
    th.join()
    return {"load": r, "decode": got, "both_done_s": round(time.perf_counter() - t, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="load.json")
    ap.add_argument("--work", default="/tmp/mg")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cold-only", action="store_true", help="only staged_cold")
    args = ap.parse_args()
    from multi_gpu import make_videos
    from prefill import random_checkpoint

    os.makedirs(args.work, exist_ok=True)
    size, minutes = ((320, 240), 0.2) if args.tiny else ((1920, 1080), args.minutes)
    device = "cpu" if args.tiny else args.device
    dtype = torch.float32 if args.tiny else torch.bfloat16
    folder = random_checkpoint(os.path.join(args.work, "tiny-ckpt" if args.tiny else "full-size-ckpt"), args.tiny)
    files = make_videos(args.work, 4, minutes, size, prefix="ld")
    warm = make_videos(args.work, 1, 0, size, prefix="ldwarm")[0]
    frames = int(minutes * 60)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
               "card": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
               "cores": len(os.sched_getaffinity(0)), "checkpoint_gb": round(sum(
                   os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1e9, 2)}

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(json.dumps(results), flush=True)

    def clear():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()

    if args.cold_only:
        dropped = drop_page_cache(folder)
        results["staged_cold"] = dict(timed(load_staged, folder, device, dtype), dropped=dropped)
        save()
        return 0
    decode(warm, device, 8)  # CUDA and NVDEC set up before anything is timed
    for path in (os.path.join(folder, f) for f in os.listdir(folder)):  # the folder into the page cache
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    results["decode_alone"] = decode(files[0], device, frames)
    for name, load in (("staged", load_staged), ("safe_open", load_safe_open)):
        results[name] = timed(load, folder, device, dtype)
        clear()
        save()
    for i, (name, load) in enumerate((("staged", load_staged), ("safe_open", load_safe_open))):
        results[f"{name}_beside_decode"] = beside(load, folder, device, dtype, files[1 + i], frames)
        clear()
        save()
    dropped = drop_page_cache(folder)  # before the timed load (it is evaluated first)
    results["staged_cold"] = dict(timed(load_staged, folder, device, dtype), dropped=dropped)
    clear()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
