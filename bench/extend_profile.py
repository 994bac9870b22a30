"""Why prefilling a chunked video slice by slice (as its frames are encoded) has cost more GPU time than one pass
(issue 19): the same prompt's KVs built both ways on the full-size architecture (random bf16 weights), with no
video, so each suspect can be switched on alone.

    python bench/extend_profile.py --out DIR [--groups 900] [--slices 16 4] [--busy 4] [--decode-beside FILE]
                                   [--beside-decoder both|nvdec|pyav] [--switch-interval S] [--profile] [--skip-alone]

Per case: the GPU span of each call (CUDA events on the work stream, as `bench/e2e.py` records "prefill"), the
host's time inside the calls, and (`--profile`) the kernels' own time from torch.profiler, so a span that is
longer than its kernels shows the GPU waiting for the host. `--busy N`: N Python threads spin beside the
prefill (the GIL contention of the decoder threads in `chat`); `--decode-beside FILE`: the file's frames are
decoded on threads beside it (`--beside-decoder`: NVDEC and CPU decoders together by default; chat's own
default is NVDEC alone). Results: DIR/extend_profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from prefill import random_model  # noqa: E402
from videoxl.checkpoint.tiny import make_tokenizer  # noqa: E402
from videoxl.pipeline import placeholder_id  # noqa: E402
from videoxl.prefill import incremental  # noqa: E402
from videoxl.prefill.growing import GrowingPrefix  # noqa: E402
from videoxl.prefill.plan import PrefillConfig  # noqa: E402
from videoxl.video.gpu import SideStream  # noqa: E402

T0 = time.perf_counter()
MASK = dict(chunk_prefill_mode="mask", chunk_size=16, step_size=4, chunk_size_for_vision_tower=96)


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Beside:
    """Work on other threads while a case runs: `busy` spinning Python threads, or a file's frames decoded."""

    def __init__(self, busy: int = 0, video: str | None = None, device=None, decoder: str = "both"):
        self.stop, self.threads, self.frames = threading.Event(), [], [0]
        self.decoder = decoder
        for _ in range(busy):
            self.threads.append(threading.Thread(target=self._spin, daemon=True))
        if video:
            self.threads.append(threading.Thread(target=self._decode, args=(video, device), daemon=True))

    def _spin(self):
        while not self.stop.is_set():
            sum(i * i for i in range(2000))

    def _decode(self, video, device):
        from videoxl.video.sources import open_video

        while not self.stop.is_set():  # again and again until the case ends
            stream = open_video(video, 600, 1.0, device=device,
                                decoder=self.decoder if device.type == "cuda" else "auto")
            for batch in stream.batches(16):
                self.frames[0] += len(batch)
                if self.stop.is_set():
                    return

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def build(model, tokenizer, chunking, visual, times, slices: int, work: SideStream, spans: list, host: list):
    """The prompt's KVs: one pass (`slices` 0) or `slices` extensions. Appends each call's CUDA-event span and
    host time."""
    cfg = model.config
    prefix = GrowingPrefix(model.decoder, tokenizer, cfg.tokens_per_group, placeholder_id(cfg, tokenizer),
                           chunking, capacity=visual.shape[0] * (cfg.tokens_per_group + 16) + 512)
    groups = visual.shape[0]
    cuts = [0, groups] if slices == 0 else [round(i * groups / slices) for i in range(slices + 1)]
    with work.work():
        for a, b in zip(cuts, cuts[1:]):
            begin, end = Mark(model.device), Mark(model.device)
            t = time.perf_counter()
            begin.record()
            if slices == 0:
                prefix.add_all(visual, times)
            else:
                prefix.add(visual[a:b], times[a:b])
            end.record()
            host.append(time.perf_counter() - t)
            spans.append((begin, end))
    sync(model.device)
    return prefix


class Mark:
    """A CUDA event on the current stream, or the host's clock on the CPU (`--tiny`)."""

    def __init__(self, device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None

    def record(self):
        if self.event is not None:
            self.event.record()
        self.t = time.perf_counter()

    def elapsed_time(self, end: "Mark") -> float:  # milliseconds, as torch.cuda.Event's
        return self.event.elapsed_time(end.event) if self.event is not None else (end.t - self.t) * 1000


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def case(model, tokenizer, chunking, visual, times, slices, beside: Beside, profile=False) -> dict:
    work = SideStream(model.device)
    spans, host = [], []
    sync(model.device)
    prof = None
    if profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA if model.device.type == "cuda"
                                                 else torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    t = time.perf_counter()
    with beside:
        prefix = build(model, tokenizer, chunking, visual, times, slices, work, spans, host)
    wall = time.perf_counter() - t
    row = {"calls": len(spans), "wall_s": round(wall, 3), "host_s": round(sum(host), 3),
           "gpu_span_s": round(sum(b.elapsed_time(e) for b, e in spans) / 1000, 3),
           "span_per_call_s": [round(b.elapsed_time(e) / 1000, 3) for b, e in spans],
           "tokens": prefix.store.length, "frames_decoded_beside": beside.frames[0]}
    if prof is not None:
        prof.__exit__(None, None, None)
        kernels = {}
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if us > 0:
                kernels[e.key] = (kernels.get(e.key, (0, 0))[0] + us, kernels.get(e.key, (0, 0))[1] + e.count)
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
        row["kernel_s"] = round(sum(us for us, _ in kernels.values()) / 1e6, 3)
        row["kernel_launches"] = sum(n for _, n in kernels.values())
        row["top_kernels"] = [(k[:90], round(us / 1e6, 3), n) for k, (us, n) in top[:12]]
    del prefix
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def plan_cases(args) -> list[tuple[str, int, int, str | None]]:
    """(mode, extensions, busy threads, video beside), the ones that answer the question first (the run may be
    cut off by its time limit): one pass against extensions alone, then with a file decoded beside, then
    spinning threads, then dense as the reference."""
    out = []
    for mode in args.modes:
        runs = ([] if args.skip_alone else [(0, None)]) + ([(0, args.decode_beside)] if args.decode_beside else []) + \
            [(b, None) for b in args.busy if b]
        for busy, video in runs:
            out += [(mode, s, busy, video) for s in [0, *args.slices]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--groups", type=int, default=900, help="groups of 4 frames (900 = an hour at 1 fps)")
    ap.add_argument("--slices", type=int, nargs="+", default=[16, 4], help="extensions per case (0 = one pass)")
    ap.add_argument("--busy", type=int, nargs="+", default=[4])
    ap.add_argument("--decode-beside", default=None, help="a video file decoded beside each case too")
    ap.add_argument("--modes", nargs="+", default=["mask", "dense"])
    ap.add_argument("--profile", action="store_true", help="also each case once under torch.profiler")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the run, in seconds (CPython's default: 0.005)")
    ap.add_argument("--beside-decoder", choices=["both", "nvdec", "pyav"], default="both",
                    help="how --decode-beside decodes (the engine's choices; 'auto' in chat is nvdec)")
    ap.add_argument("--skip-alone", action="store_true", help="only the cases with work beside")
    ap.add_argument("--tiny", action="store_true", help="the tiny config on the CPU: a smoke test of this script")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    device = torch.device("cpu" if args.tiny else "cuda")
    model = random_model(device, args.tiny)
    tokenizer = make_tokenizer(tempfile.mkdtemp())
    incremental.FLEX_EXTENSIONS = True  # what `bench/e2e.py --flex-extensions` switches on
    torch.manual_seed(0)
    tpg, hidden = model.config.tokens_per_group, model.decoder.embed_tokens.weight.shape[1]
    visual = (torch.randn(args.groups, tpg, hidden, device=device) * 0.02).to(model.decoder.embed_tokens.weight.dtype)
    times = [4.0 * g for g in range(args.groups)]
    warmed: set[str] = set()
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "groups": args.groups,
           "switch_interval_s": sys.getswitchinterval(), "cases": {}}
    log("model ready")
    with torch.inference_mode():  # as chat runs it (autograd would keep every layer's activations)
        for mode, slices, busy, video in plan_cases(args):
            chunking = None if mode == "dense" else PrefillConfig.from_dict(MASK)
            if mode not in warmed:  # compiles (one for all lengths), at a small size
                for s in (0, 4):
                    case(model, tokenizer, chunking, visual[:40], times[:40], s, Beside())
                warmed.add(mode)
            name = f"{mode}-{'one-pass' if slices == 0 else f'{slices}-ext'}-busy{busy}" + ("-decode" if video else "")
            try:
                row = case(model, tokenizer, chunking, visual, times, slices,
                           Beside(busy, video, device, args.beside_decoder))
                if args.profile and busy == 0 and not video:
                    row["profiled"] = case(model, tokenizer, chunking, visual, times, slices, Beside(), True)
            except Exception as e:  # noqa: BLE001 - a case that fails is a row saying why
                row = {"error": f"{type(e).__name__}: {e}"[:300]}
            res["cases"][name] = row
            log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                         if k in ("wall_s", "host_s", "gpu_span_s", "frames_decoded_beside", "error"))
                + (f"; kernels {row['profiled'].get('kernel_s')} s in {row['profiled'].get('kernel_launches')}"
                   if "profiled" in row else ""))
            with open(os.path.join(args.out, "extend_profile.json"), "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
