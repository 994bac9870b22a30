"""Time to first token with the video KV cache: a fresh video, a repeat question (memory), after a restart (disk).

    python bench/serve_cache.py --frames 2048 --out serve_cache.json [--chunk-prefill mask] [--tiny]

Full-size Video-XL-2 architecture with random bf16 weights made on the GPU (`--tiny`: the tiny config on the
CPU, a smoke test of this script). The video is a synthetic clip written to an mp4 and sampled uniformly to
`--frames` frames, so "fresh" includes decoding the file, as a server would. Questions go through
`model.stream_chat`, the path the server's workers run; time to first token is the model's own `ttft_s`
(question received -> first answer token, on the device clock), and the wall time to the first text piece is
reported too.

  fresh        a video the cache has never seen: decode + vision + prefill + question
  memory       another question on it: the prefix KVs are in memory, only the question is prefilled
  disk         a restart: a new, empty cache object on the same folder (what a new process finds), with the
               entry's files dropped from the OS page cache first (posix_fadvise), so they are read from disk
  disk_warm    the same with the files still in the page cache (a restart soon after the write)
`capture_s` is the decode step's CUDA-graph capture, paid by every new KV store (fresh and disk), inside the
time to first token. A restart is simulated in-process (same weights, new cache object): a new process would also pay the model
load and the weights digest (`digest_s`, reported), once, not per video.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from prefill import log, random_model  # noqa: E402

from videoxl.checkpoint.tiny import make_demo_video, make_tokenizer  # noqa: E402
from videoxl.cache.store import VideoKVCache  # noqa: E402


def drop_page_cache(folder: str) -> bool:
    """Ask the kernel to forget the cached pages of the entry's files (clean pages: they were fsynced)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def ask(model, tokenizer, video, question, frames, tokens) -> dict:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0, first, pieces = time.perf_counter(), None, []
    for piece in model.stream_chat(video, tokenizer, question, None, frames, None, None,
                                   {"max_new_tokens": tokens}):
        first = first or time.perf_counter()
        pieces.append(piece)
    s = model.last_stats
    return {"ttft_s": s.get("ttft_s"), "first_piece_s": round((first or time.perf_counter()) - t0, 3),
            "kv_cache": s["kv_cache"], "prompt_tokens": s["prompt_tokens"], "cached_tokens": s["cached_tokens"],
            "vision_s": s.get("vision_s"), "prefill_s": s.get("prefill_s"), "load_s": s.get("load_s"),
            "peak_gpu_gb": s.get("peak_gpu_gb"), "decode_path": s.get("decode_path"),
            "capture_s": s.get("capture_s"), "answer": "".join(pieces),
            "slow_disk_reads": model.kv_cache.disk.slow_reads if model.kv_cache.disk else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--out", default="serve_cache.json")
    ap.add_argument("--kv-dir", default=None, help="cache folder (default: a new temporary one)")
    ap.add_argument("--kv-cache-gb", type=float, default=16.0)
    ap.add_argument("--tokens", type=int, default=8, help="answer tokens per question")
    ap.add_argument("--chunk-prefill", choices=["mask", "streaming"], default=None,
                    help="chunk prefill in this mode, the reference's evaluation setting (default: dense)")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke test of this script")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    work = tempfile.mkdtemp(prefix="serve-cache-")
    kv_dir = args.kv_dir or os.path.join(work, "kv")
    model = random_model(device, args.tiny)
    if args.chunk_prefill:
        model.config.enable_chunk_prefill = True
        model.config.prefill_config = {"chunk_prefill_mode": args.chunk_prefill, "chunk_size": 16, "step_size": 4,
                                       "chunk_size_for_vision_tower": 96}
    tokenizer = make_tokenizer(os.path.join(work, "tok"))
    log("model ready")
    fps = 30
    video = make_demo_video(os.path.join(work, "video.mp4"), seconds=args.frames / fps, fps=fps, size=(160, 120))
    warm = make_demo_video(os.path.join(work, "warm.mp4"), seconds=64 / fps, fps=fps, size=(160, 120))
    log(f"videos written ({os.path.getsize(video) / 2**20:.1f} MiB)")

    ask(model, tokenizer, warm, "Warm up.", 64, args.tokens)  # kernels loaded, on a cache that is thrown away
    gb = args.kv_cache_gb
    t0 = time.perf_counter()
    model.kv_cache = VideoKVCache(int(gb * 2**30), kv_dir)
    digest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.weights_digest()
    digest_s += time.perf_counter() - t0
    runs = {}
    runs["fresh"] = ask(model, tokenizer, video, "What happens in this video?", args.frames, args.tokens)
    log(f"fresh: {runs['fresh']['ttft_s']} s")
    runs["memory"] = ask(model, tokenizer, video, "What colour is the square?", args.frames, args.tokens)
    log(f"memory: {runs['memory']['ttft_s']} s")
    t0 = time.perf_counter()
    model.kv_cache.flush()
    write_s = time.perf_counter() - t0  # what was left of the background write after the answer
    [entry] = [os.path.join(kv_dir, d) for d in os.listdir(kv_dir) if not d.startswith((".", "uuids"))]
    entry_gb = sum(os.path.getsize(os.path.join(entry, f)) for f in os.listdir(entry)) / 2**30

    model.kv_cache = VideoKVCache(int(gb * 2**30), kv_dir)  # the restart: nothing in memory
    dropped = drop_page_cache(entry)
    runs["disk"] = ask(model, tokenizer, video, "What happens in this video?", args.frames, args.tokens)
    log(f"disk: {runs['disk']['ttft_s']} s (page cache dropped: {dropped})")
    model.kv_cache = VideoKVCache(int(gb * 2**30), kv_dir)
    runs["disk_warm"] = ask(model, tokenizer, video, "What happens in this video?", args.frames, args.tokens)
    log(f"disk_warm: {runs['disk_warm']['ttft_s']} s")

    fresh = runs["fresh"]["ttft_s"]
    result = {"device": "cpu (tiny)" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "frames": args.frames,
              "prefill": args.chunk_prefill or "dense", "entry_gb": round(entry_gb, 3),
              "write_wait_s": round(write_s, 3), "digest_s": round(digest_s, 3), "page_cache_dropped": dropped,
              "same_answer_fresh_disk": len({runs[k]["answer"] for k in ("fresh", "disk", "disk_warm")}) == 1,
              "speedup_vs_fresh": {k: round(fresh / r["ttft_s"], 1) for k, r in runs.items() if r["ttft_s"]},
              "runs": runs}
    for name, r in runs.items():
        expected = {"fresh": "miss", "memory": "memory", "disk": "disk", "disk_warm": "disk"}[name]
        assert r["kv_cache"] == expected, (name, r["kv_cache"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, {args.frames} frames, {result['prefill']} prefill, entry {entry_gb:.2f} GiB")
    print(f"{'case':>10} {'ttft s':>8} {'1st piece s':>11} {'vs fresh':>9} {'cached':>8} {'prompt':>8} "
          f"{'vision s':>9} {'prefill s':>10} {'load s':>7} {'capture s':>9}")
    for name, r in runs.items():
        print(f"{name:>10} {r['ttft_s']!s:>8} {r['first_piece_s']!s:>11} "
              f"{result['speedup_vs_fresh'].get(name, '')!s:>8}x {r['cached_tokens']:>8} {r['prompt_tokens']:>8} "
              f"{r['vision_s']!s:>9} {r['prefill_s']!s:>10} {r['load_s']!s:>7} {r['capture_s']!s:>9}")
    print(f"same answer fresh/disk: {result['same_answer_fresh_disk']}; wrote {args.out}")


if __name__ == "__main__":
    main()
