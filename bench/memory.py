"""The memory estimate (`videoxl/memory.py`) against the measured peaks of `bench/prefill.py`, and the frames
that fit on 16 / 24 / 40 / 80 GB cards per mode, weight precision (bf16, and the decoder layers in int8 or
int4: `quantize=`) and KV cache (bf16, or fp8: `kv_dtype=`). CPU only: it reads `bench/results/*.json`, measures
nothing.

    python bench/memory.py [--out bench/results/memory_estimate.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from videoxl.memory import GiB, estimate, max_frames, weight_bytes  # noqa: E402
from videoxl.model import VideoXL  # noqa: E402
from videoxl.checkpoint.tiny import full_size_config  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
WAY_TO_MODE = {"dense": "dense", "mask": "mask", "streaming": "streaming+offload"}  # bench's streaming offloads
CARDS_GB = (16, 24, 40, 80)
PRECISIONS = ("bf16", "int8", "int4")  # of the decoder layers' weights
KV_DTYPES = ("bf16", "fp8")  # of the KV cache
CONTEXT_GIB = 1.0  # the CUDA context and what else the card holds: not free to us
VISION_SLICE = {"dense": 96, "mask": 24, "streaming": 24, "streaming+offload": 24}  # chat's / the CLI's defaults


def full_size_weights(quantize: str | None = None) -> int:
    with torch.device("meta"):
        model = VideoXL(full_size_config())
    return weight_bytes({n: tuple(p.shape) for n, p in model.named_parameters()}, quantize, 2)


def measured_runs() -> list[dict]:
    """Every (frames, way) measured on the GPU once (the newest file wins), transformers' way left out."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "prefill_*.json")), key=os.path.getmtime):
        data = json.load(open(path))
        for r in data["runs"]:
            if r.get("way") in WAY_TO_MODE and isinstance(r.get("peak_gb"), (int, float)):
                runs[(r["frames"], r["way"])] = dict(r, device=data["device"],
                                                     slice=data["chunking"]["chunk_size_for_vision_tower"])
    return [runs[k] for k in sorted(runs)]


def comparison(weights: int) -> list[dict]:
    cfg = full_size_config()
    rows = []
    for r in measured_runs():
        mode = WAY_TO_MODE[r["way"]]
        e = estimate(cfg, r["frames"], mode, weights, r["tokens"], r["slice"], 2)
        rows.append({"frames": r["frames"], "mode": mode, "tokens": r["tokens"], "measured_gib": r["peak_gb"],
                     "estimate_gib": round(e.total / GiB, 2),
                     "error": round(e.total / GiB / r["peak_gb"] - 1, 4), "device": r["device"]})
    return rows


def card_table(weights: dict[str, int]) -> list[dict]:
    cfg = full_size_config()
    rows = []
    for mode in ("dense", "mask", "streaming", "streaming+offload"):
        for precision in PRECISIONS:
            for kv in KV_DTYPES:
                row = {"mode": mode, "weights": precision, "kv": kv, "vision_slice": VISION_SLICE[mode]}
                for gb in CARDS_GB:
                    budget = int((gb - CONTEXT_GIB) * GiB)
                    row[f"{gb}GB"] = max_frames(cfg, budget, mode, weights[precision], VISION_SLICE[mode], 2,
                                                kv_dtype=None if kv == "bf16" else kv)
                rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(RESULTS, "memory_estimate.json"))
    args = ap.parse_args()
    all_weights = {p: full_size_weights(None if p == "bf16" else p) for p in PRECISIONS}
    weights = all_weights["bf16"]
    comp, cards = comparison(weights), card_table(all_weights)
    print("weights: " + ", ".join(f"{p} {w / GiB:.2f} GiB" for p, w in all_weights.items()) + "\n")
    print("| frames | mode | prompt tokens | measured peak (GiB) | estimate (GiB) | error |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in comp:
        print(f"| {r['frames']} | {r['mode']} | {r['tokens']} | {r['measured_gib']} | {r['estimate_gib']} | "
              f"{100 * r['error']:+.1f}% |")
    print("\n| mode (vision batch) | weights | KVs | " + " | ".join(f"{gb} GB card" for gb in CARDS_GB) + " |")
    print("|---|---|---|" + "---:|" * len(CARDS_GB))
    for r in cards:
        print(f"| {r['mode']} ({r['vision_slice']}) | {r['weights']} | {r['kv']} | "
              + " | ".join(f"{r[f'{gb}GB']:,}" for gb in CARDS_GB) + " |")
    with open(args.out, "w") as f:
        json.dump({"weights_gib": {p: round(w / GiB, 3) for p, w in all_weights.items()}, "comparison": comp, "cards": cards,
                   "context_gib": CONTEXT_GIB}, f, indent=1)


if __name__ == "__main__":
    main()
