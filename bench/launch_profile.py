"""Where a fresh `videoxl chat` process's time goes before its first token (issue 19's cold start): the CLI's
sequence run in a child process with a timestamp at each step and around each part of `videoxl.load`.

    python bench/launch_profile.py --model DIR --video FILE --out launch_profile.json [--orders ...] [--device cuda]

Orders:
  prefetch-first   as `videoxl chat` does: frame decoding starts, then the load (tokenizer on a thread);
  no-prefetch      the load, then the question decodes its frames;
  tokenizer-first  the tokenizer (and transformers' import) first, then the frames and the weights together.
Each child answers one question (16 tokens, dense) and reports its marks (seconds since the child's first line)
and the question's stats; the parent adds the interpreter's start (launch to first line).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def child(model_dir: str, video: str, order: str, device: str, frames: int) -> None:
    t0 = time.perf_counter()
    print("started", flush=True)
    marks, spans = {}, {}

    def mark(name):
        marks[name] = round(time.perf_counter() - t0, 3)

    def wrap(module, name):
        real = getattr(module, name)

        def timed(*a, **k):
            s = time.perf_counter() - t0
            try:
                return real(*a, **k)
            finally:
                spans[name] = (round(s, 3), round(time.perf_counter() - t0, 3))
        setattr(module, name, timed)

    import torch
    mark("import_torch")
    import videoxl
    import videoxl.cli.main  # noqa: F401  what the command imports first
    from videoxl.checkpoint import loader
    from videoxl.devices import parse_device
    from videoxl.video.prefetch import Prefetch
    mark("import_videoxl")
    for name in ("load_tokenizer", "load_model", "empty_model", "scan", "read_all"):
        wrap(loader, name)
    dev = parse_device(device)
    if dev.type == "cuda":
        torch.cuda.init()
        torch.empty(1, device=dev)
    mark("cuda_ready")
    if order == "tokenizer-first":
        loader.load_tokenizer(model_dir)
        mark("tokenizer_first_done")
    prefetch = None if order == "no-prefetch" else Prefetch(video, (frames, 1.0, None), dev)
    mark("prefetch_started")
    if prefetch is not None:  # when its stream is open (index read, decoders made) and its first frames came
        def watch():
            while not prefetch.done and "prefetch_first_frames" not in marks:
                if prefetch.stream is not None and "prefetch_stream_open" not in marks:
                    mark("prefetch_stream_open")
                if prefetch.parts:
                    mark("prefetch_first_frames")
                time.sleep(0.005)
            prefetch.thread.join()
            mark("prefetch_all_frames")
        threading.Thread(target=watch, daemon=True).start()
    model, tokenizer = videoxl.load(model_dir, device=dev)
    mark("loaded")
    if prefetch is not None:
        model.prefetched = prefetch
    first = []
    model.chat(video, tokenizer, "What happens in this video?", max_num_frames=frames,
               generation_config={"max_new_tokens": 16, "do_sample": False},
               on_text=lambda piece: first or (first.append(1), mark("first_text")))
    mark("answered")
    keep = ("video_decoder", "video_decode_s", "first_token_s", "vision_s", "prefill_s", "prompt_tokens")
    stats = {k: v for k, v in model.last_stats.items() if k in keep or k.startswith("video_")}
    print(json.dumps({"marks": marks, "spans": spans, "stats": stats}, default=str), flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6], int(sys.argv[6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--video", required=True)
    ap.add_argument("--out", default="launch_profile.json")
    ap.add_argument("--orders", nargs="+", default=["prefetch-first", "no-prefetch", "tokenizer-first"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=600)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
               "video": os.path.basename(args.video), "runs": {}}
    for order in args.orders:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, __file__, "--child", args.model, args.video, order, args.device,
                              str(args.frames)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        p.stdout.readline()
        started = time.perf_counter() - t
        out, err = p.communicate()
        try:
            run = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            run = {"error": err[-800:]}
        run.update(interpreter_start_s=round(started, 3), wall_s=round(time.perf_counter() - t, 3))
        results["runs"][order] = run
        print(order, json.dumps(run)[:600], flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
