"""Frame decoding for sampling: old path vs the new ones, on x264-default 1080p and 720p files made here.

    python bench/video_decode.py --work /tmp/vx --out results.json [--minutes 10] [--hour] [--ttft]

Files: testsrc2 (FFmpeg's moving test pattern, ~10 Mbit/s at 1080p) encoded once for 60 s with libx264 at its
defaults (preset medium, keyint 250, bframes 3, B-pyramid), then the packets repeated (timestamps shifted)
to 10 minutes, and to 60 minutes with --hour: a real x264 bitstream, decoded as any other.
Paths: old = the code before this change (decode every frame up to the last needed one, RGB + PIL resize of
the kept ones); pyav-wN = the new CPU path with N decoder threads; nvdec-wN = NVDEC through PyAV with N
sessions; keyframes = the approximate mode; decord / torchcodec = CPU readers a user could pick instead.
The old path, decord and torchcodec run on the first 2 minutes only (their rate is what is compared).
Each row: wall seconds, source frames/s (frames of the video covered / wall), seconds per hour of video,
frames the decoders were fed. --ttft: time to first token of the full-size random-weight model (bf16) on the
1080p file vs the same frames pre-decoded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from videoxl.video.sources import load_video, open_video, resize_frame, sample_frame_indices  # noqa: E402

T0 = time.perf_counter()
RESULTS: dict = {"rows": []}


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def save(out):
    with open(out, "w") as f:
        json.dump(RESULTS, f, indent=1)


# A camera's file: x264 veryfast, a 2-second GOP, 2 B-frames, and temporal noise (sensor grain): 13.9 Mbit/s
# at 1080p30 (a 4-s clip measured; noise 7: 8.0, 10: 38, 13: 64), near issue 19's 15.6 Mbit/s camera-like file.
CAMERA = {"noise": "alls=8:allf=t", "options": {"preset": "veryfast", "g": "60", "bf": "2"}}


def encode_chunk(path, width, height, seconds=60, fps=30, camera=False):
    """testsrc2 encoded with libx264: at its defaults, or camera-like (CAMERA)."""
    import av
    import av.filter

    g = av.filter.Graph()
    chain = [g.add("testsrc2", f"size={width}x{height}:rate={fps}:duration={seconds}")]
    if camera:
        chain.append(g.add("noise", CAMERA["noise"]))
    chain += [g.add("format", "yuv420p"), g.add("buffersink")]
    for a, b in zip(chain, chain[1:]):
        a.link_to(b)
    g.configure()
    tb = Fraction(1, fps)
    with av.open(path, "w") as out:
        s = out.add_stream("libx264", rate=fps, options=CAMERA["options"] if camera else {})
        s.width, s.height, s.pix_fmt, s.time_base = width, height, "yuv420p", tb
        n = 0
        while True:
            try:
                f = g.pull()
            except (av.error.EOFError, av.error.BlockingIOError):
                break
            f.pts, f.time_base, f.pict_type = n, tb, 0  # pict_type I from the source would force keyframes
            n += 1
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return n


def repeat(src, dst, copies, frames, fps=30):
    import av

    with av.open(src) as first:
        tb = first.streams.video[0].time_base
    shift = int(round(frames / fps / tb))
    with av.open(dst, "w") as out:
        with av.open(src) as i:
            o = out.add_stream_from_template(i.streams.video[0])
        for c in range(copies):
            with av.open(src) as i:
                s = i.streams.video[0]
                for p in i.demux(s):
                    if not p.size:
                        continue
                    p.pts += c * shift
                    p.dts += c * shift
                    p.stream = o
                    out.mux(p)


SIZES = {"1080p": (1920, 1080), "720p": (1280, 720), "4k": (3840, 2160)}


def make_files(work, plan):
    """plan: {name: (seconds encoded, [minutes of each file made by repeating it])}"""
    os.makedirs(work, exist_ok=True)
    files = {}
    for name, (seconds, lengths) in plan.items():
        w, h = SIZES[name]
        chunk = os.path.join(work, f"{name}-{seconds}s.mp4")
        t = time.perf_counter()
        n = encode_chunk(chunk, w, h, seconds)
        log(f"encoded {name} {seconds} s ({n} frames) in {time.perf_counter() - t:.1f}s, "
            f"{os.path.getsize(chunk) * 8 / seconds / 1e6:.1f} Mbit/s")
        for minutes in lengths:
            path = os.path.join(work, f"{name}-{minutes}min.mp4")
            repeat(chunk, path, round(minutes * 60 / seconds), n)
            files[f"{name}-{minutes}min"] = path
        log(f"{name}: files {sorted(k for k in files if k.startswith(name))}")
    return files


def old_path(path, max_num_frames, sample_fps):
    """The decoding loop as it was before this change (for comparison)."""
    import av

    c = av.open(path)
    s = c.streams.video[0]
    total, fps = s.frames, float(s.average_rate)
    indices = sample_frame_indices(total, fps, max_num_frames, sample_fps)
    wanted, last, frames = set(indices), indices[-1], []
    s.thread_type = "AUTO"
    for n, frame in enumerate(c.decode(s)):
        if n in wanted:
            frames.append(resize_frame(frame.to_ndarray(format="rgb24")))
        if n >= last:
            break
    c.close()
    return len(frames), last + 1


def torchcodec_path(path, max_num_frames, sample_fps):
    from torchcodec.decoders import VideoDecoder

    d = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=os.cpu_count())
    m = d.metadata
    indices = sample_frame_indices(m.num_frames, m.average_fps, max_num_frames, sample_fps)
    n = 0
    for s in range(0, len(indices), 96):  # full-size frames, no resize: only the decoding is timed
        n += len(d.get_frames_at(indices[s:s + 96]).data)
    return n, indices[-1] + 1


def timed_row(file_key, path, sampling, way, fn):
    t = time.perf_counter()
    try:
        kept, covered, extra = fn()
    except Exception as e:  # noqa: BLE001 - a path that fails is a row that says why
        log(f"{file_key} {sampling} {way}: FAILED {type(e).__name__}: {str(e)[:200]}")
        RESULTS["rows"].append(dict(file=file_key, sampling=sampling, way=way, error=f"{type(e).__name__}: {e}"[:300]))
        return None
    wall = time.perf_counter() - t
    row = dict(file=file_key, sampling=sampling, way=way, wall_s=round(wall, 3), frames=kept,
               source_frames_covered=covered, source_fps=round(covered / wall, 1),
               s_per_hour=round(wall * 30 * 3600 / covered, 1), **extra)
    RESULTS["rows"].append(row)
    log(f"{file_key:12s} {sampling:10s} {way:12s} {wall:7.2f}s {covered / wall:8.0f} src fr/s "
        f"{row['s_per_hour']:7.1f} s/h  {extra}")
    return row


def new_path(path, max_num_frames, sample_fps, **options):
    def run():
        stream = open_video(path, max_num_frames, sample_fps, **options)
        n = sum(len(b) for b in stream.batches(96))
        if options.get("device") is not None:
            import torch
            torch.cuda.synchronize()
        s = stream.stats
        keep = {k[6:]: s[k] for k in ("video_decoder", "video_workers", "video_frames_read", "video_decode_s",
                                      "video_scan_s", "video_seeks", "video_approx_max_error_s",
                                      "video_nvdec_unavailable") if k in s}
        return n, stream.kept[-1] + 1, keep
    return run


SAMPLINGS = {"1fps": (2048, 1), "uniform2048": (2048, None)}


def decode_table(files, cuda):
    cores = os.cpu_count()
    for name in ("1080p", "720p"):
        short, long = files[f"{name}-2min"], files[f"{name}-10min"]
        ways = {f"pyav-w{cores}": dict(decoder="pyav", workers=cores),
                "keyframes": dict(decoder="pyav", mode="keyframes")}
        if name == "1080p":
            ways["pyav-w1"] = dict(decoder="pyav", workers=1)
        if cuda:
            ways.update({f"nvdec-w{n}": dict(decoder="nvdec", device="cuda", workers=n)
                         for n in ((1, 4) if name == "1080p" else (4,))})
        for sampling, (m, fps) in SAMPLINGS.items():
            ms = m if fps else m * 2 // 10  # uniform: as many frames per minute as the 10-minute rows take
            timed_row(f"{name}-2min", short, sampling, "old", lambda: (*old_path(short, ms, fps), {}))
            if name == "1080p":
                timed_row(f"{name}-2min", short, sampling, "decord", new_path(short, ms, fps, decoder="decord"))
                timed_row(f"{name}-2min", short, sampling, "torchcodec-cpu",
                          lambda: (*torchcodec_path(short, ms, fps), {}))
            for way, opts in ways.items():
                if way in ("pyav-w1", "nvdec-w1") and sampling != "1fps":
                    continue
                timed_row(f"{name}-10min", long, sampling, way, new_path(long, m, fps, **opts))


def nvdec_vs_cpu(path):
    cpu = load_video(path, 64, None, decoder="pyav")
    gpu = load_video(path, 64, None, decoder="nvdec", device="cuda")
    assert cpu.indices == gpu.indices
    d = np.abs(cpu.frames.astype(int) - gpu.frames.astype(int))
    RESULTS["nvdec_vs_cpu"] = dict(frames=len(cpu), max_abs=int(d.max()), mean_abs=float(d.mean()),
                                   share_differing=float((d > 0).mean()))
    log(f"NVDEC vs CPU pixels (64 frames): {RESULTS['nvdec_vs_cpu']}")


def nvdec_codecs(work):
    """HEVC and VP9 (encoders at hand in PyAV's FFmpeg) through NVDEC vs the CPU decoder."""
    import av
    import av.filter

    out = {}
    for codec, ext, opts in (("libx265", "mp4", {"preset": "ultrafast", "x265-params": "log-level=error"}),
                             ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"})):
        path = os.path.join(work, f"{codec}.{ext}")
        g = av.filter.Graph()
        src = g.add("testsrc2", "size=640x360:rate=30:duration=2")
        fmt = g.add("format", "yuv420p")
        src.link_to(fmt)
        fmt.link_to(g.add("buffersink"))
        g.configure()
        tb = Fraction(1, 30)
        with av.open(path, "w") as o:
            st = o.add_stream(codec, rate=30)
            st.width, st.height, st.pix_fmt, st.time_base, st.options = 640, 360, "yuv420p", tb, opts
            n = 0
            while True:
                try:
                    f = g.pull()
                except (av.error.EOFError, av.error.BlockingIOError):
                    break
                f.pts, f.time_base, f.pict_type, n = n, tb, 0, n + 1
                for p in st.encode(f):
                    o.mux(p)
            for p in st.encode(None):
                o.mux(p)
        try:
            cpu = load_video(path, 16, None, decoder="pyav")
            stream = open_video(path, 16, None, device="cuda")
            gpu = np.concatenate([b.cpu().numpy() if hasattr(b, "cpu") else b for b in stream.batches(16)])
            d = np.abs(cpu.frames.astype(int) - gpu.astype(int))
            out[codec] = dict(decoder=stream.stats["video_decoder"], same_indices=cpu.indices == stream.kept,
                              max_abs=int(d.max()), mean_abs=round(float(d.mean()), 3),
                              nvdec_unavailable=stream.stats.get("video_nvdec_unavailable"))
        except Exception as e:  # noqa: BLE001
            out[codec] = f"FAILED {type(e).__name__}: {e}"[:300]
        log(f"{codec}: {out[codec]}")
    RESULTS["nvdec_codecs"] = out


def ttft(path, device="cuda", tiny=False, workers=None, cpu_too=True):
    import torch

    import videoxl.model as model_module
    from bench.prefill import random_model
    from videoxl.checkpoint.tiny import make_tokenizer
    import tempfile

    model = random_model(torch.device(device), tiny=tiny)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tok = make_tokenizer(tempfile.mkdtemp())
    gen = {"max_new_tokens": 1}
    out = {}

    def one(video, m, fps):
        sync()
        t = time.perf_counter()
        model.kv_cache.clear()
        model.chat(video, tok, "What happens?", max_num_frames=m, sample_fps=fps, generation_config=gen)
        sync()
        return round(time.perf_counter() - t, 3), dict(model.last_stats)

    one(path, 64, None)  # warm-up: kernels, NVDEC, FlexAttention
    from videoxl.video.sources import FrameStream

    original = model_module.open_video
    for sampling, (m, fps) in SAMPLINGS.items():
        clip = load_video(path, m, fps)
        frames = clip.frames
        model_module.open_video = lambda *a, **k: FrameStream.from_clip(clip)
        pre, pre_stats = one(path, m, fps)
        model_module.open_video = original
        model_module.open_video = lambda *a, **k: original(*a, **k, **({"workers": workers} if workers else {}))
        nv, nv_stats = one(path, m, fps)
        cpu, cpu_stats = None, {}
        if cpu_too:
            model_module.open_video = lambda *a, **k: original(*a, **{**k, "decoder": "pyav", "device": None})
            cpu, cpu_stats = one(path, m, fps)
        model_module.open_video = original
        out[sampling] = dict(frames=len(frames), predecoded_s=pre, file_auto_s=nv, file_cpu_s=cpu,
                             ratio_auto=round(nv / pre, 2), ratio_cpu=round(cpu / pre, 2) if cpu else None,
                             auto_stats=nv_stats, cpu_stats=cpu_stats, predecoded_stats=pre_stats)
        log(f"TTFT {sampling}: pre-decoded {pre}s, file (auto: {nv_stats.get('video_decoder')}) {nv}s, "
            f"file (cpu) {cpu}s")
    RESULTS["ttft"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/vx")
    ap.add_argument("--out", default="video_decode.json")
    ap.add_argument("--hour", action="store_true")
    ap.add_argument("--ttft", action="store_true")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--nvdec-sweep", action="store_true", help="NVDEC sessions 4/8/12 on 1080p, 4K, HEVC/VP9")
    args = ap.parse_args()
    import av
    import torch

    cuda = torch.cuda.is_available()
    RESULTS["env"] = dict(cpu_count=os.cpu_count(), av=av.__version__, torch=torch.__version__,
                          gpu=torch.cuda.get_device_name() if cuda else None,
                          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        from av.codec.hwaccel import hwdevices_available
        RESULTS["env"]["hwdevices"] = hwdevices_available()
    except ImportError:
        pass
    RESULTS["env"]["libnvcuvid"] = subprocess.run("ldconfig -p | grep -c nvcuvid", shell=True,
                                                  capture_output=True, text=True).stdout.strip()
    log(f"env {RESULTS['env']}")
    plan = {"1080p": (60, [10] + ([60] if args.hour else []))}
    if not args.skip_table:
        plan = {"1080p": (60, [2, 10] + ([60] if args.hour else [])), "720p": (60, [2, 10])}
    if args.nvdec_sweep:
        plan["4k"] = (10, [2])
    files = make_files(args.work, plan)
    RESULTS["files"] = {k: dict(path=v, bytes=os.path.getsize(v)) for k, v in files.items()}
    save(args.out)
    if cuda and not args.skip_table:
        try:
            nvdec_vs_cpu(files["1080p-2min"])
        except Exception as e:  # noqa: BLE001
            RESULTS["nvdec_vs_cpu"] = f"FAILED {type(e).__name__}: {e}"
            log(RESULTS["nvdec_vs_cpu"])
        save(args.out)
    if not args.skip_table:
        decode_table(files, cuda)
        save(args.out)
    cores, best = os.cpu_count(), None
    if args.nvdec_sweep and cuda:
        nvdec_codecs(args.work)
        path, times = files["1080p-10min"], {}
        for n in (4, 8, 12):
            row = timed_row("1080p-10min", path, "1fps", f"nvdec-w{n}",
                            new_path(path, 2048, 1, decoder="nvdec", device="cuda", workers=n))
            times[n] = row["wall_s"] if row else 1e9
        best = min(times, key=times.get)
        RESULTS["nvdec_best_workers"] = best
        k4 = files["4k-2min"]
        timed_row("4k-2min", k4, "1fps", f"pyav-w{cores}", new_path(k4, 2048, 1, decoder="pyav", workers=cores))
        timed_row("4k-2min", k4, "1fps", f"nvdec-w{best}", new_path(k4, 2048, 1, decoder="nvdec", device="cuda",
                                                                    workers=best))
        save(args.out)
    if args.hour:
        path = files["1080p-60min"]
        if not args.nvdec_sweep:
            timed_row("1080p-60min", path, "1fps", f"pyav-w{cores}",
                      new_path(path, 2048, 1, decoder="pyav", workers=cores))
        if cuda:
            n = best or 4
            timed_row("1080p-60min", path, "1fps", f"nvdec-w{n}", new_path(path, 2048, 1, decoder="nvdec",
                                                                          device="cuda", workers=n))
        save(args.out)
    if args.ttft and cuda:
        ttft(files["1080p-10min"], workers=best, cpu_too=not args.nvdec_sweep)
        save(args.out)
    log("done")


if __name__ == "__main__":
    main()
