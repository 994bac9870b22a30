"""The split-KV decode attention kernel alone (decoding/kernels.py), one query token of the full-size decoder (28
query heads, 4 KV heads, 128 dims) over a long cache, bf16 and fp8 (language/kv_fp8.py), across tile sizes,
warps, pipeline stages and splits: is it reading K/V at the memory's speed, and which configuration is fastest?

    python bench/attn_sweep.py --out attn_sweep.json [--tokens 79133 387882]

Times are CUDA-event spans of a CUDA graph replaying 20 calls (as the captured decode step runs them: no launch
overhead), after a warm-up; GB/s counts the K/V bytes read (and the scales). fp8 runs both ways of converting
e4m3 for the dot products (to bf16, or to fp16: `f16`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from videoxl.decoding import kernels  # noqa: E402
from videoxl.language import kv_fp8  # noqa: E402


def timed(fn, reps: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (3 * reps) / 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attn_sweep.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[79133, 387882])
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "runs": []}
    grid = list(itertools.product((64, 128), (4, 8), (2, 3), (None, 64, 256), (False, True)))
    for tokens in args.tokens:
        q = torch.randn(28, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(4, tokens, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn(4, tokens, 128, device=dev, dtype=torch.bfloat16)
        k8, ks = kv_fp8.quantize(k[None])
        v8, vs = kv_fp8.quantize(v[None])
        k8, v8 = k8[0], v8[0]
        length = torch.tensor([tokens], dtype=torch.int32, device=dev)
        ref = kernels.decode_attention(q, k, v, length)
        for kv in ("bf16", "fp8"):
            nbytes = 2 * k.numel() * (2 if kv == "bf16" else 1) + (0 if kv == "bf16" else 8 * tokens)
            best = None
            for block_n, warps, stages, splits, f16 in grid:
                if f16 and kv == "bf16":
                    continue
                a = (q, k, v, length) if kv == "bf16" else (q, k8, v8, length)
                extra = {} if kv == "bf16" else {"scales": (ks, vs), "f16": f16}
                try:
                    out = kernels.decode_attention(*a, splits=splits, block_n=block_n, num_warps=warps,
                                                   num_stages=stages, **extra)
                    err = (out.float() - ref.float()).abs().max().item()
                    s = timed(lambda: kernels.decode_attention(*a, splits=splits, block_n=block_n, num_warps=warps,
                                                               num_stages=stages, **extra))
                except Exception as e:  # noqa: BLE001  (a configuration the compiler refuses: shared memory)
                    res["runs"].append({"tokens": tokens, "kv": kv, "block_n": block_n, "warps": warps,
                                        "stages": stages, "splits": splits, "f16": f16,
                                        "error": str(e).splitlines()[0][:200]})
                    continue
                run = {"tokens": tokens, "kv": kv, "block_n": block_n, "warps": warps, "stages": stages,
                       "splits": splits, "f16": f16, "us": round(s * 1e6, 1), "GB_s": round(nbytes / s / 1e9, 1),
                       "max_err_vs_bf16_default": round(err, 4)}
                res["runs"].append(run)
                if best is None or run["us"] < best["us"]:
                    best = run
            default = next(r for r in res["runs"] if r.get("tokens") == tokens and r.get("kv") == kv and
                           (r.get("block_n"), r.get("warps"), r.get("stages"), r.get("splits"), r.get("f16")) ==
                           (64, 4, 3, None, False))
            print(json.dumps({"tokens": tokens, "kv": kv, "default": default, "best": best}), flush=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        del k, v, k8, v8
        torch.cuda.empty_cache()
    res["picks"] = picks(res["runs"])
    print("picks:", json.dumps(res["picks"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


def picks(runs: list[dict]) -> dict:
    """Per cache dtype, the settings whose slowest case (over the lengths swept) is closest to that case's best."""
    out = {}
    for kv in ("bf16", "fp8"):
        mine = [r for r in runs if r["kv"] == kv and "us" in r]
        lengths = sorted({r["tokens"] for r in mine})
        best = {n: min(r["us"] for r in mine if r["tokens"] == n) for n in lengths}
        key = lambda r: (r["block_n"], r["warps"], r["stages"], r["splits"], r["f16"])  # noqa: E731
        scores = {}
        for r in mine:
            scores.setdefault(key(r), {})[r["tokens"]] = r["us"] / best[r["tokens"]]
        block_n, warps, stages, splits, f16 = min((k for k, v in scores.items() if len(v) == len(lengths)),
                                                  key=lambda k: max(scores[k].values()))
        out[kv] = {"block_n": block_n, "num_warps": warps, "num_stages": stages, "splits": splits, "f16": f16,
                   "worst_vs_best": round(max(scores[(block_n, warps, stages, splits, f16)].values()), 3)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
