"""The int8 GEMV kernel's tiles (issue 22): for each decoder layer shape of Qwen2.5-7B, one row, time each
(BLOCK_N, BLOCK_K, warps, split of K) and report the weight bytes read per second, beside bf16's F.linear on the
same layer.

    python bench/int8_tiles.py --out DIR [--loop]

Each config is timed as the decode step runs it: a CUDA graph of 20 calls, replayed (bench/attn_sweep.timed).
`--loop` times 50 launches in a loop instead (the third session's method: for the narrow layers, whose kernels
take a few microseconds, that measured launch overhead). Results: DIR/int8_tiles.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from attn_sweep import timed  # noqa: E402
from videoxl.language.int8_gemv import default_tiles, int8_gemv  # noqa: E402

SHAPES = {"qkv": (4608, 3584), "o_proj": (3584, 3584), "gate_up": (37888, 3584), "down_proj": (3584, 18944)}


def time_loop_ms(fn, calls=50) -> float:
    for _ in range(20):
        fn()
    runs = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        runs.append(a.elapsed_time(b) / calls)
    return statistics.median(runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--loop", action="store_true", help="time launches in a loop, not CUDA graphs")
    args = ap.parse_args()

    def time_ms(fn):
        return time_loop_ms(fn) if args.loop else timed(fn) * 1000

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {},
           "method": "loop of 50 launches" if args.loop else "CUDA graph of 20 calls"}
    for name, (n, k) in SHAPES.items():
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        s = torch.rand(n, device="cuda") * 0.01
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = time_ms(lambda: F.linear(x, wb))
        row = {"bf16_ms": round(ref, 4), "bf16_GBps": round(n * k * 2 / ref / 1e6, 1), "configs": {}}
        splits = (1, 2, 4, 8) if n * k < 40_000_000 else (1, 2)  # the narrow layers have too few programs
        for bn, bk, warps, split in itertools.product((4, 8, 16, 32), (512, 1024, 2048), (4, 8), splits):
            name_c = f"{bn}x{bk}w{warps}s{split}"
            try:
                ms = time_ms(lambda: int8_gemv(x, w, s, None, (bn, bk, warps, split)))
            except Exception as e:  # noqa: BLE001 - a config Triton cannot build is a row that says so
                row["configs"][name_c] = str(e)[:80]
                continue
            row["configs"][name_c] = round(n * k / ms / 1e6, 1)  # GB/s of int8 weight
        best = max((v, c) for c, v in row["configs"].items() if isinstance(v, float))
        row["best"], row["best_GBps"] = best[1], best[0]
        row["current"] = "{}x{}w{}s{}".format(*default_tiles(n, k))
        row["current_GBps"] = row["configs"].get(row["current"])
        out["shapes"][name] = row
        print(name, {k: row[k] for k in ("bf16_GBps", "current_GBps", "best", "best_GBps")}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "int8_tiles.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
