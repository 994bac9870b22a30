"""FP8 vision (issue 22, `vision_dtype="fp8"`): time per frame of the vision side (SigLIP -> DTS -> projector ->
pool) in bf16 and with FP8 GEMMs, and the error of the fp8 visual tokens against bf16's, on the full-size
architecture with random weights (bench/prefill.py's random_model) and random frames.

    python bench/vision_fp8.py --out DIR [--frames 768] [--slice 96] [--repeats 3] [--tiny]

Each way is warmed on one slice, then timed over --frames frames in slices of --slice (what chat's vision does,
frames already on the GPU: no decoding), best of --repeats; ms/frame = seconds / frames. Results:
DIR/vision_fp8.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from prefill import random_model  # noqa: E402

from videoxl.vision.precision import quantize_vision  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(vision, frames, per_slice, device, repeats) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        torch.cat(list(vision.encode(frames[:per_slice], per_slice)))  # warm-up (kernels, autotuning)
        best, out = float("inf"), None
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            out = torch.cat(list(vision.encode(frames, per_slice)))
            sync(device)
            best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, default=768)
    ap.add_argument("--slice", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke test of this script")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    model = random_model(device, args.tiny)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.frames, 384, 384, 3),
                                                               dtype=np.uint8)).to(device)
    result = {"device": "cpu" if args.tiny else torch.cuda.get_device_name(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "frames": args.frames,
              "slice": args.slice}
    base_s, base = timed(model.vision, frames, args.slice, device, args.repeats)
    fp8_vision = copy.deepcopy(model.vision)
    with torch.device(device):
        result["layers_quantized"] = quantize_vision(fp8_vision, "fp8")
    fp8_s, got = timed(fp8_vision, frames, args.slice, device, args.repeats)
    err = ((got.float() - base.float()).norm() / base.float().norm()).item()
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(1), base.float().flatten(1)).mean().item()
    result.update(bf16_ms_per_frame=round(base_s / args.frames * 1e3, 3), fp8_ms_per_frame=round(fp8_s / args.frames * 1e3, 3),
                  speedup=round(base_s / fp8_s, 3), tokens_rel_l2_error=round(err, 4), tokens_cosine=round(cos, 5))
    print(json.dumps(result, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vision_fp8.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
