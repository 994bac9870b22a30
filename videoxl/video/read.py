"""Opening a video file for sampling: read its header, choose the decoder, return a FrameStream that indexes the
packets and decodes when it is read.

Decoders (`decoder=`):
  "auto"    NVDEC when the model's device is a CUDA GPU and PyAV's CUDA decoding works on this file, else "pyav".
  "pyav"    FFmpeg on the CPU: one decoder per worker thread over keyframe-aligned stretches (`workers`, default
            one per core up to 16), only the packets sampling needs. Pixels equal a full sequential decode's.
  "nvdec"   FFmpeg's NVDEC hardware decoding through PyAV (`workers` sessions, default 12, the best measured on
            an H200; 8 was an H100's best); frames stay in GPU memory and reach the model as CUDA
            tensors. Decoded YUV equals the CPU decoder's; the RGB conversion may differ by a few levels (see
            video_gpu). Refused with a clear line when unavailable.
  "both"    NVDEC's sessions and CPU decoders (half the cores less two, up to 14: see `cpu_beside`) take runs from
            one queue; the CPU's frames are moved to the GPU. Each frame is as its decoder gives it (the RGB of an
            NVDEC frame within 3 levels of the CPU's). Packets per kind: `video_packets_by_decoder`.
  "decord"  the reference's reader, if installed.
Modes (`mode=`): "exact" (default) returns the sampled frames themselves; "keyframes" returns, for each sampled
frame, the keyframe nearest in time (each distinct one once, at its own timestamp), decoding keyframes only; the
largest distance in seconds is reported as `video_approx_max_error_s`.
Variable frame rate: frames are sampled by number as the reference does; their timestamps are their real times
(the reference would print number / average rate). A rotation tag that is a multiple of 90 degrees is applied
(frames turned upright, as players show them); any other angle is refused. Packets without timestamps (raw
H.264 streams): every frame is decoded in order and the n-th ones kept.
"""
from __future__ import annotations

import os
import time

import numpy as np

from videoxl.cancel import check
from videoxl.errors import VideoXLError
from videoxl.video.index import plan, probe
from videoxl.video.decode import Engine, JobReader, chain, cpu_convert, keyframe_jobs
from videoxl.video.mp4index import scan
from videoxl.video.stream import FrameStream, _short, resize_frame

NVDEC_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mpeg1video", "mpeg2video", "mpeg4", "vc1"}
DECODERS = ("auto", "pyav", "nvdec", "both", "decord")
NVDEC_SESSIONS = 12  # NVDEC sessions by default: the best on an H200 (bench/e2e.py: 10 min, 8 / 12 / 16 sessions)
CPU_DECODERS_MAX = 16  # CPU decoders by default: one per core, up to this many
BOTH_CPU_DECODERS: int | None = None  # "both": CPU decoders beside the sessions (None: cpu_beside(cores))
MODES = ("exact", "keyframes")


def cpu_beside(cores: int) -> int:
    """CPU decoders beside the NVDEC sessions for "both". The sessions' threads (demuxing, the per-frame
    conversion's launches) and the thread launching the model's kernels need cores too. On 32 cores 14 decoders
    were best (28 slower; bench/RESULTS.md, third session); on 16 cores 14 decoders starved NVDEC (786 packets/s
    against 2,480) and the vision tower (seventh session). Half the cores less two keeps 14 on 32; fewer cores
    were not measured with this rule."""
    return max(1, min(cores // 2, CPU_DECODERS_MAX) - 2)


def rotation_turns(degrees) -> int:
    """Quarter turns counter-clockwise that show the frame upright (FFmpeg's display-matrix convention)."""
    degrees = round(degrees or 0)
    if degrees % 90:
        raise VideoXLError(f"video carries a rotation of {degrees} degrees, not a multiple of 90: not supported")
    return (degrees // 90) % 4


def open_file(path: str, sampler, decoder: str = "auto", device=None, mode: str = "exact",
              workers: int | None = None, on_damage: str = "error"):
    """`sampler(total_frames, fps) -> frame numbers`; returns a FrameStream (see video.open_video)."""
    import av

    if decoder not in DECODERS:
        raise VideoXLError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if mode not in MODES:
        raise VideoXLError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if on_damage not in ("error", "skip"):
        raise VideoXLError(f"on_damage must be 'error' or 'skip', got {on_damage!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise VideoXLError(f"workers must be a positive integer or None, got {workers!r}")
    if decoder == "decord":
        return _open_decord(path, sampler)
    try:
        container = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoXLError(f"not a readable video: {path} ({_short(e)})") from None
    with container:
        header = probe(container, path, header_only=True)  # the packets are indexed when decoding starts
    sampled = sampler(header.total, header.fps)
    if mode != "exact" and header.scanned and header.index is None:
        raise VideoXLError(f"mode {mode!r} needs packet timestamps, which this video lacks: {path}")
    stats = {"video_decoder": "pyav", "video_mode": mode}
    accel, convert, stack = None, cpu_convert(rotation_turns), np.stack
    opener = lambda: av.open(path)  # noqa: E731
    if decoder in ("auto", "nvdec", "both"):
        accel, why = _nvdec(header, device)
        if accel is None and decoder != "auto":
            raise VideoXLError(f"decoder {decoder!r} is not available: "
                               f"{why or f'frames are wanted on {device}, not a GPU'}")
        if accel is not None:
            import torch

            from videoxl.video.gpu import nvdec_convert, on_current_gpu, open_nvdec
            gpu = on_current_gpu(device)
            convert, stack = nvdec_convert(rotation_turns, gpu), torch.stack
            opener = lambda: open_nvdec(path, accel, gpu)  # noqa: E731
            stats["video_decoder"] = "nvdec+pyav" if decoder == "both" else "nvdec"
        elif why:
            stats["video_nvdec_unavailable"] = why
    cores = usable_cores()
    if workers is None:
        workers = min(cores, CPU_DECODERS_MAX) if accel is None else NVDEC_SESSIONS

    def engines(runs: int) -> list[Engine]:
        n = max(1, min(workers, runs))
        if accel is None:  # fewer runs than cores (a short clip): the spare cores become threads in each decoder
            return [Engine("pyav", opener, convert, max(1, cores // n))] * n
        out = [Engine("nvdec", opener, convert)] * n
        if decoder == "both":  # CPU decoders beside the sessions, leaving two cores to feed NVDEC
            cpu = on_device(cpu_convert(rotation_turns), gpu)
            beside = BOTH_CPU_DECODERS or cpu_beside(cores)
            out += [Engine("pyav", lambda: av.open(path), cpu)] * beside
        return out

    def read(size):
        t0, given = time.perf_counter(), 0
        info = header if header.scanned else scan(path, header)  # MP4: from its sample tables
        if info.index is None:  # no timestamps to find frames by (raw streams): count them in one decode
            if mode != "exact":
                raise VideoXLError(f"mode {mode!r} needs packet timestamps, which this video lacks: {path}")
            yield from _sequential(path, sampled, size, stats, stream.cancel)
            return
        wanted = [k for k in sampled if k < len(info.index)]
        if not wanted:
            raise VideoXLError(f"corrupt video, no frame could be decoded: {path}")
        vfr = info.index.is_vfr()
        stats.update(video_frames_total=len(info.index), video_scan_s=round(info.scan_s, 3), video_vfr=vfr)
        if vfr:
            stream.seconds = info.seconds
        if mode == "keyframes":
            jobs, sub, worst = keyframe_jobs(info, wanted)
            stats["video_approx_max_error_s"] = round(worst, 3)
        else:
            jobs = plan(info.index, wanted)
        reader = JobReader(info, jobs, engines(len(chain(jobs))), stack, on_damage, stream.cancel)
        stats.update(video_workers=reader.workers, video_threads_per_decoder=reader.engines[0].threads)
        try:
            for numbers, frames in reader.batches(size):
                given += len(numbers)
                yield numbers, frames
            if not given:
                raise VideoXLError(f"corrupt video, no frame could be decoded: {path}")
        finally:
            fed = sum(r.packets_fed for r in reader.reports)
            if decoder == "both":
                stats["video_packets_by_decoder"] = reader.packets_by_kind()
            stats.update(video_decode_s=round(time.perf_counter() - t0, 3), video_frames_read=fed,
                         video_seeks=sum(r.seeks for r in reader.reports),
                         video_frames_missing=len(reader.missing) + len(sampled) - len(wanted),
                         video_frames_skipped=len(reader.skipped))

    stream = FrameStream(path, sampled, header.fps, header.total, read, stats=stats)
    return stream


def on_device(convert, device):
    """A CPU decoder's frames as tensors on the GPU, to be stacked with NVDEC's (decoders of both kinds)."""
    import torch

    return lambda frame: torch.tensor(convert(frame), device=device)  # a copy: PIL's arrays are read-only


def _nvdec(info, device):
    """(HWAccel, None) when NVDEC can decode this file for `device`, else (None, reason)."""
    if device is None:
        return None, None
    import torch

    from videoxl.video.gpu import nvdec_accel, on_current_gpu, open_nvdec
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    if info.codec not in NVDEC_CODECS:
        return None, f"codec {info.codec} has no NVDEC decoder"
    accel, why = nvdec_accel(device)
    if accel is None:
        return None, why
    device = on_current_gpu(device)
    import av

    try:  # decode the first frame: NVDEC refuses some profiles (4:4:4, some 10-bit) only when it sees them
        with open_nvdec(info.path, accel, device) as c:
            for frame in c.decode(video=0):
                if frame.format.name != "cuda":
                    return None, f"NVDEC cannot decode this {info.codec} stream (software frames came back)"
                if frame.format.name == "cuda" and getattr(frame, "sw_format", None) is not None \
                        and frame.sw_format.name != "nv12":
                    return None, f"NVDEC output {frame.sw_format.name} is not handled (8-bit 4:2:0 only)"
                break
    except (av.FFmpegError, NotImplementedError, RuntimeError) as e:
        return None, f"NVDEC failed on this file: {str(e)[:120]}"
    return accel, None


def _open_decord(path, sampler) -> FrameStream:
    try:
        from decord import VideoReader, cpu
    except ImportError:
        raise VideoXLError("decoder 'decord' is not installed (pip install decord), use 'pyav'") from None
    try:
        vr = VideoReader(path, ctx=cpu(0))
    except Exception as e:  # decord raises its own untyped errors
        raise VideoXLError(f"not a readable video: {path} ({_short(e)})") from None
    fps = vr.get_avg_fps()
    if len(vr) == 0 or fps <= 0:
        raise VideoXLError(f"video has no frames or no frame rate: {path}")
    indices = sampler(len(vr), fps)

    def read(size):
        for s in range(0, len(indices), size):
            part = indices[s:s + size]
            yield part, np.stack([resize_frame(f) for f in vr.get_batch(part).asnumpy()])

    return FrameStream(path, indices, fps, len(vr), read, stats={"video_decoder": "decord"})


def _sequential(path, wanted, size, stats, cancel=None):
    """Decode every frame in order and keep the n-th ones: frame numbers by definition, for files whose
    packets carry no timestamps (raw H.264 and the like), where nothing can be skipped."""
    import av

    stats.update(video_decoder="pyav-sequential", video_vfr=False)
    convert = cpu_convert(rotation_turns)
    t0, keep, last, numbers, frames, n = time.perf_counter(), set(wanted), wanted[-1], [], [], -1
    try:
        with av.open(path) as c:
            c.streams.video[0].thread_type = "AUTO"
            for n, frame in enumerate(c.decode(video=0)):
                check(cancel)
                if n in keep:
                    numbers.append(n)
                    frames.append(convert(frame))
                    if len(frames) == size:
                        yield numbers, np.stack(frames)
                        numbers, frames = [], []
                if n >= last:
                    break
    except av.FFmpegError as e:  # the frames before the damage were returned; the rest are missing
        stats["video_error"] = _short(e)
    if frames:
        yield numbers, np.stack(frames)
    stats.update(video_decode_s=round(time.perf_counter() - t0, 3), video_frames_read=n + 1)
    if n < 0:
        raise VideoXLError(f"corrupt video, no frame could be decoded: {path}")


def usable_core_ids() -> list[int]:
    """The cores the calling thread may run on (taskset, a container's CPU set, a worker's slice); [] where the
    platform does not say."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def usable_cores() -> int:
    """Cores this process may run on (taskset, a container's CPU set), not the machine's count."""
    return len(usable_core_ids()) or os.cpu_count() or 1


def core_shares(cores: list[int], n: int) -> list[list[int]]:
    """n workers' slices of `cores` (one worker per GPU: batch and serve). Each worker sizes its frame decoders
    and torch's threads by the cores it may use (`usable_cores`), so n workers that each took every core would
    run n times as many decoder threads as there are cores (on two H200s, `batch`: 0.97x one GPU before the
    split, 1.58x after, with other changes)."""
    cores = sorted(cores)
    if n <= 1 or len(cores) < n:
        return [cores] * max(n, 1)
    return [cores[i * len(cores) // n:(i + 1) * len(cores) // n] for i in range(n)]


def pin_to_cores(cores: list[int] | None, size_torch: bool = True) -> None:
    """Run the calling thread (and the threads it starts: its decoders) on `cores`; with `size_torch`, size
    torch's pool to them too (process-wide: only in a process whose torch work is this worker's)."""
    if not cores:
        return
    try:
        os.sched_setaffinity(0, cores)  # Linux: 0 is the calling thread, which new threads inherit
    except (AttributeError, OSError):
        return
    if size_torch:
        import torch

        torch.set_num_threads(len(cores))
