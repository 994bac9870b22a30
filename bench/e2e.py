"""File -> first token, end to end (issue 19, item 5): decoding, vision, prefill and answer of one question on
the full-size architecture with random bf16 weights, per file and decoder, with each stage's times, the GPU's
time waiting for frames and a timeline figure; plus `videoxl chat` from launch to first token.

    python bench/e2e.py --out DIR [--minutes 10 60] [--encodings x264 camera] [--decoders nvdec cpu both]
                        [--prefill mask|streaming|dense] [--flex-extensions | --prefill-split 0.8] [--tokens 128]
                        [--ceiling] [--launch] [--tiny] [--gil-switch S]
                        [--nvdec-sessions 8 12 16] [--cpu-decoders 14 28]   (a case per combination)

Files (made under --work, kept for the next call): testsrc2 encoded for --chunk-seconds at --size, then its
packets repeated to each length (bench/video_decode.py): "x264" = libx264 defaults, "camera" = veryfast, a
2-second GOP, 2 B-frames, temporal noise. Each question samples 1 frame/s (all of them), answers --tokens tokens,
on an empty KV cache and a content id not yet known (the file's hash runs as a first question's would); the
kernels were warmed by a question on the chunk file first. --ceiling: bench/cpu_ceiling.py on each file (our
CPU path against one single-threaded decoder per core). --launch: `videoxl chat` in a fresh process on a
full-size checkpoint folder (written once under --work), its files dropped from the page cache, then again.
Results accumulate in DIR/e2e.json (one entry per case); figures: DIR/timeline-<case>.png.
--tiny: the tiny config on the CPU and 320x180 files: a smoke test of this script.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import videoxl.pipeline as pipeline_module  # noqa: E402
from videoxl.prefill import growing, incremental  # noqa: E402
from videoxl.video import read as read_module  # noqa: E402
from videoxl.video.read import usable_cores  # noqa: E402
from cpu_ceiling import measure  # noqa: E402
from e2e_plot import timeline_png  # noqa: E402
from prefill import random_checkpoint, random_model  # noqa: E402
from serve_cache import drop_page_cache  # noqa: E402
from video_decode import encode_chunk, repeat  # noqa: E402
from videoxl.cache import identity  # noqa: E402
from videoxl.checkpoint.tiny import make_tokenizer  # noqa: E402
from videoxl.timeline import idle_waiting, merged  # noqa: E402
from videoxl.video.sources import open_video  # noqa: E402

T0 = time.perf_counter()
DECODERS = {"nvdec": "nvdec", "cpu": "pyav", "both": "both"}  # "both": NVDEC and CPU workers at once
QUESTION = "Describe what happens in this video."


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def make_file(work, encoding, minutes, chunk_s, size) -> tuple[str, str, float]:
    """(file, chunk file, Mbit/s): the chunk encoded once, its packets repeated to `minutes`."""
    w, h = size
    chunk = os.path.join(work, f"{encoding}-{w}x{h}-{chunk_s}s.mp4")
    if not os.path.exists(chunk):
        t = time.perf_counter()
        encode_chunk(chunk + ".tmp.mp4", w, h, chunk_s, camera=encoding == "camera")
        os.replace(chunk + ".tmp.mp4", chunk)
        log(f"encoded {os.path.basename(chunk)} in {time.perf_counter() - t:.1f} s")
    path = os.path.join(work, f"{encoding}-{w}x{h}-{minutes:g}min.mp4")
    if not os.path.exists(path):
        repeat(chunk, path + ".tmp.mp4", max(1, round(minutes * 60 / chunk_s)), chunk_s * 30)
        os.replace(path + ".tmp.mp4", path)
    return path, chunk, round(os.path.getsize(chunk) * 8 / chunk_s / 1e6, 2)


def use_decoder(name: str, sessions: int | None = None, beside: int | None = None) -> None:
    """chat's frames through `name` (the engine picks NVDEC or CPU by itself; a benchmark must choose), with
    `sessions` NVDEC sessions and, for "both", `beside` CPU decoders (None: the engine's defaults)."""
    read_module.BOTH_CPU_DECODERS = beside
    pipeline_module.open_video = functools.partial(open_video, decoder=DECODERS[name],
                                                   workers=sessions if name != "cpu" else None)


def breakdown(stats: dict) -> dict:
    """Each stage's share of the question, from its timeline (seconds from the question's start)."""
    ev = stats["timeline"]

    def spans(stage):
        return [(s, e) for name, s, e in ev if name == stage]

    dec, vis, pre = spans("decode"), spans("vision"), spans("prefill")
    out = {"ttft_s": stats.get("ttft_s"), "frames": stats.get("frames")}
    if dec:
        out.update(decode_start_s=dec[0][0], decode_end_s=max(e for _, e in dec),
                   decode_window_s=round(max(e for _, e in dec) - dec[0][0], 3))
        out["frames_decoded_per_s"] = round(stats["frames"] / max(out["decode_window_s"], 1e-9), 1)
    if vis:
        busy = sum(e - s for s, e in merged(ev, ["vision"]))
        out.update(vision_busy_s=round(busy, 3), vision_end_s=max(e for _, e in vis),
                   frames_encoded_per_busy_s=round(stats["frames"] / max(busy, 1e-9), 1),
                   gpu_idle_waiting_for_frames_s=idle_waiting(ev))
        if dec:
            out["vision_after_last_frame_s"] = round(out["vision_end_s"] - out["decode_end_s"], 3)
    if pre:  # one span per batch of slices, overlapped with decoding (pipeline.build_prefix)
        out.update(prefill_busy_s=round(sum(e - s for s, e in merged(ev, ["prefill"])), 3),
                   prefill_end_s=max(e for _, e in pre), prefill_batches=len(pre))
        if dec:
            out["prefill_after_last_frame_s"] = round(out["prefill_end_s"] - out["decode_end_s"], 3)
    for stage in ("first_token", "answer", "hash"):
        if spans(stage):
            s, e = spans(stage)[0]
            out[f"{stage}_start_s"], out[f"{stage}_s"] = s, round(e - s, 3)
    keep = ("video_decoder", "video_nvdec_unavailable", "video_workers", "video_threads_per_decoder",
            "video_packets_by_decoder", "video_frames_read", "video_decode_s", "video_scan_s", "vision_s", "prefill_s", "peak_gpu_gb",
            "generated_tokens", "decode_tokens_per_s", "prefill", "video_tokens",
            "prefill_overlapped", "prefill_launch_s")  # host time inside the as-encoded prefill calls
    out.update({k: stats[k] for k in keep if k in stats})
    return out


def ask(model, tokenizer, path, frames, tokens):
    model.kv_cache.clear()
    identity._content_ids.clear()  # a first question: its file not hashed yet
    model.chat(path, tokenizer, QUESTION, max_num_frames=frames, sample_fps=1,
               generation_config={"do_sample": False, "max_new_tokens": tokens})
    return model.last_stats


def set_prefill(model, mode: str, offload: bool) -> None:
    model.config.enable_sparse = False
    model.config.enable_chunk_prefill = mode != "dense"
    model.config.prefill_config = None if mode == "dense" else {
        "chunk_prefill_mode": mode, "chunk_size": 16, "step_size": 4, "offload": offload,
        "chunk_size_for_vision_tower": 96}


def questions(args, files, results) -> None:
    device = torch.device("cpu" if args.tiny else "cuda")
    model = random_model(device, args.tiny)
    set_prefill(model, args.prefill, args.offload)
    if args.flex_extensions:  # chunked slices prefilled as encoded, each as one FlexAttention kernel
        incremental.FLEX_EXTENSIONS = True
        pipeline_module.prefill_as_encoded = lambda device, chunking: True
    if args.one_pass:  # every mode's one-shot prefill after the last frame (dense prefills as encoded by default)
        pipeline_module.prefill_as_encoded = lambda device, chunking: False
    if args.prefill_split:  # two extensions (FlexAttention kernels), the first at this share of the frames
        incremental.FLEX_EXTENSIONS, growing.PREFILL_SPLIT = True, args.prefill_split
    tokenizer = make_tokenizer(tempfile.mkdtemp())
    log("model ready")
    warmed = set()
    engines = [(d, s, b) for d in args.decoders for s in (args.nvdec_sessions if d != "cpu" else [None])
               for b in (args.cpu_decoders if d == "both" else [None])]
    for (encoding, minutes), (path, chunk, mbps) in files.items():
        for decoder, sessions, beside in engines:
            case = f"{encoding}-{minutes:g}min-{decoder}-{args.prefill}" + (f"-s{sessions}" if sessions else "") \
                + (f"-c{beside}" if beside else "") + ("-flex" if args.flex_extensions else "") \
                + (f"-split{args.prefill_split:g}" if args.prefill_split else "") + ("-onepass" if args.one_pass else "")
            try:
                use_decoder(decoder, sessions, beside)
                if args.gil_switch:  # the GIL switch interval for the question (measured: no gain, RESULTS.md)
                    sys.setswitchinterval(args.gil_switch)
                if (encoding, decoder) not in warmed:  # kernels, NVDEC sessions, the decode graph
                    ask(model, tokenizer, chunk, 64, 4)
                    warmed.add((encoding, decoder))
                t = time.perf_counter()
                stats = ask(model, tokenizer, path, int(minutes * 60), args.tokens)
                row = dict(breakdown(stats), wall_s=round(time.perf_counter() - t, 3))
            except Exception as e:  # noqa: BLE001 - a case that fails is a row that says why
                row = {"error": f"{type(e).__name__}: {e}"[:400]}
                log(f"{case}: FAILED {row['error']}")
            else:
                row["figure"] = os.path.basename(timeline_png(
                    stats["timeline"], os.path.join(args.out, f"timeline-{case}.png"),
                    f"{case}: first token {row['ttft_s']} s ({results['device']})"))
                log(f"{case}: first token {row['ttft_s']} s, decode {row.get('decode_window_s')} s "
                    f"({row.get('video_decoder')}), GPU idle waiting {row.get('gpu_idle_waiting_for_frames_s')} s")
            row.update(file=os.path.basename(path), mbit_s=mbps, minutes=minutes, decoder=decoder, cores=usable_cores(),
                       nvdec_sessions=sessions, cpu_decoders_beside=beside, flex_extensions=args.flex_extensions,
                       prefill_split=args.prefill_split, gil_switch_s=sys.getswitchinterval())
            results["cases"][case] = row
            save(args.out, results)


def launch(args, video, results) -> None:
    """`videoxl chat` from launch to first text, on a full-size checkpoint folder: cold, then from the page
    cache."""
    folder = random_checkpoint(os.path.join(args.work, "tiny-ckpt" if args.tiny else "full-size-ckpt"), args.tiny)
    gb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30
    minutes = args.minutes[0]
    cmd = [sys.executable, "-m", "videoxl.cli.main", "chat", "--model", folder, video, QUESTION, "--no-progress",
           "--max-num-frames", str(int(minutes * 60)), "--max-new-tokens", str(args.tokens)]
    if args.prefill != "dense":
        cmd += ["--chunk-prefill", args.prefill] + (["--offload"] if args.offload else [])
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # before what the caller had (wheels)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    for case in ("cold", "page_cache"):
        dropped = drop_page_cache(folder) if case == "cold" else None
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        p.stdout.read(1)
        first = time.perf_counter() - t
        _, err = p.communicate()
        err = err.decode(errors="replace")
        loaded = re.search(r"loaded model from .* \(([\d.]+) s\)", err)
        ttft = re.search(r"first token ([\d.]+)s", err)
        results["launch"][f"{case}-{args.prefill}-{minutes:g}min"] = {
            "launch_to_first_text_s": round(first, 3), "exit": p.returncode, "checkpoint_gb": round(gb, 2),
            "page_cache_dropped": dropped, "load_s": float(loaded.group(1)) if loaded else None,
            "question_ttft_s": float(ttft.group(1)) if ttft else None, "video": os.path.basename(video),
            "stderr_tail": err[-600:]}
        log(f"launch {case}: first text {first:.1f} s after launch (load {loaded and loaded.group(1)} s)")
        save(args.out, results)
    results["launch"]["disk_read_gib_s"] = disk_read_gb_s(folder)  # compare with checkpoint_gb / load_s
    log(f"the disk reads the checkpoint at {results['launch']['disk_read_gib_s']} GiB/s")


def disk_read_gb_s(folder: str) -> float | None:
    """The disk's own read speed on the checkpoint's files (page cache dropped, 8 threads, 16 MiB reads): what
    a cold load could reach."""
    from concurrent.futures import ThreadPoolExecutor

    if not drop_page_cache(folder):
        return None
    files = [os.path.join(folder, f) for f in os.listdir(folder)]

    def read(path):
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read, files))
    return round(sum(os.path.getsize(f) for f in files) / 2**30 / (time.perf_counter() - t), 2)


def save(out, results) -> None:
    with open(os.path.join(out, "e2e.json"), "w") as f:
        json.dump(results, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for e2e.json and the timeline figures")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "videoxl-e2e"))
    ap.add_argument("--minutes", type=float, nargs="+", default=[10])
    ap.add_argument("--encodings", nargs="+", choices=["x264", "camera"], default=["camera"])
    ap.add_argument("--decoders", nargs="+", choices=list(DECODERS), default=["nvdec", "cpu"])
    ap.add_argument("--prefill", choices=["mask", "streaming", "dense"], default="mask")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--chunk-seconds", type=int, default=60)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--ceiling", action="store_true", help="our CPU path against the per-core ceiling")
    ap.add_argument("--launch", action="store_true", help="`videoxl chat` launch -> first token, cold and warm")
    ap.add_argument("--no-questions", action="store_true", help="only --ceiling / --launch")
    ap.add_argument("--flex-extensions", action="store_true",
                    help="chunked modes: prefill each slice as it is encoded, one FlexAttention kernel per extension "
                         "(prefill/incremental.FLEX_EXTENSIONS; off by default until this measures it faster)")
    ap.add_argument("--one-pass", action="store_true", help="prefill after the last frame in every mode")
    ap.add_argument("--prefill-split", type=float, default=None,
                    help="prefill in two extensions, the first once this share of the frames is encoded "
                         "(prefill/growing.PREFILL_SPLIT; off by default until this measures it faster)")
    ap.add_argument("--nvdec-sessions", type=int, nargs="+", default=[None],
                    help="NVDEC sessions (one case per value; default: the engine's, read.NVDEC_SESSIONS)")
    ap.add_argument("--cpu-decoders", type=int, nargs="+", default=[None],
                    help="'both': CPU decoders beside the sessions (one case per value; default: the engine's)")
    ap.add_argument("--gil-switch", type=float, default=None,
                    help="sys.setswitchinterval for the questions, in seconds (default: the interpreter's 5 ms)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU, 320x180: a smoke test")
    args = ap.parse_args()
    size = (320, 180) if args.tiny else tuple(int(x) for x in args.size.split("x"))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    try:
        with open(os.path.join(args.out, "e2e.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {"cases": {}, "ceiling": {}, "launch": {}}
    results.update(device="cpu (tiny)" if args.tiny else torch.cuda.get_device_name(), cores=usable_cores(),
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    files = {(e, m): make_file(args.work, e, m, args.chunk_seconds, size)
             for e in args.encodings for m in args.minutes}
    log(f"files ready: {', '.join(os.path.basename(f[0]) for f in files.values())}")
    if args.ceiling:
        for (encoding, minutes), (path, _, _) in files.items():
            results["ceiling"][os.path.basename(path)] = r = measure(path, usable_cores(), 1.0)
            log(f"ceiling {os.path.basename(path)}: ours {r['ours']['packets_per_s']} packets/s, one decoder per "
                f"core {r['ceiling_same']['packets_per_s']} on the same packets, "
                f"{r['ceiling_all']['packets_per_s']} on every packet")
            save(args.out, results)
    if not args.no_questions:
        questions(args, files, results)
    if args.launch:
        launch(args, next(iter(files.values()))[0], results)
    save(args.out, results)


if __name__ == "__main__":
    main()
