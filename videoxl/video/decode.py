"""Decoding the planned jobs: each worker thread owns a decoder and takes the next run of jobs (jobs that touch,
decoded in one go) from a shared queue in frame order, so frames arrive in order at the speed of all the
workers together and no worker idles while another still holds a long share. A worker feeds only the packets
its jobs need (a job starts at a keyframe; disposable H.264 frames that are not kept are never fed), matches
output frames to frame numbers by pts, and hands over a job's frames once the whole job decoded
cleanly. The reader returns them in frame order, so consumers see one sequential stream.

Damage: a job in which the decoder raised or flagged a frame corrupt keeps none of its frames (a frame can
refer to a damaged one that is shown after it). Frames lost at the end of the file are a truncation: the
frames before are kept and the loss is reported. Frames lost before a frame that decoded cleanly are a
damaged middle: an error, unless `on_damage="skip"`, which drops them and reports the count.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from videoxl.cancel import Either, check
from videoxl.errors import VideoXLError
from videoxl.video.index import Job, Probe
from videoxl.video.stream import resize_frame

CANCEL_POLL_S = 0.05  # how often a consumer waiting for a frame looks at its Cancel
SEEK_MIN_PACKETS = 300  # a gap this long is skipped with a container seek; shorter ones are read through


@dataclass
class WorkerReport:
    packets_fed: int = 0
    seeks: int = 0
    damaged: list[int] = field(default_factory=list)  # frame numbers lost to decoding errors


def _packets(container, stream):
    for p in container.demux(stream):
        if p.size:
            yield p


def chain(jobs: list[Job]) -> list[list[Job]]:
    """Jobs that touch or overlap are decoded in one go, without a restart between them."""
    runs: list[list[Job]] = []
    for job in jobs:
        if runs and job.start <= max(j.end for j in runs[-1]) + 1:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def decode_jobs(probe: Probe, next_run: Callable[[], list[Job] | None], convert: Callable,
                emit: Callable[[int, object], None], stop: threading.Event, open_container: Callable,
                threads: int = 1) -> WorkerReport:
    """Decode the runs `next_run()` hands out (each ascending, None: no more) on one decoder; emit(frame number,
    converted frame) job by job.

    A job's frames are handed over once every packet up to its last one has come out of the decoder, so a
    frame that refers to a later-shown damaged frame is never handed over before the damage is seen."""
    import av

    index, report = probe.index, WorkerReport()
    container = open_container()
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        if threads > 1:
            stream.thread_type = "AUTO"
        codec = stream.codec_context
        packets, pos = None, -1
        while not stop.is_set() and (run := next_run()) is not None:
            want = {index.frame_pts(k): k for job in run for k in job.frames}
            start, end = run[0].start, max(j.end for j in run)
            if packets is None or start <= pos or start - pos > SEEK_MIN_PACKETS:
                packets, pos = _seek(container, stream, index, start, report)
            waiting = sorted(run, key=lambda j: j.end)
            pending: dict[int, int] = {}  # pts -> packet position: fed, not out of the decoder yet
            kept: dict[int, object] = {}
            damaged: set[int] = set()  # job starts

            def mark(positions):
                damaged.update(j.start for j in run for q in positions if j.start <= q <= j.end)

            def release(everything=False):
                if everything:
                    low = end + 1
                else:  # every packet before `low` has come out of the decoder
                    low = min(pending.values()) if pending else pos + 1
                while waiting and waiting[0].end < low:
                    job = waiting.pop(0)
                    if job.start in damaged:
                        report.damaged += job.frames
                    for k in job.frames:
                        frame = kept.pop(k, None)
                        if frame is not None and job.start not in damaged:
                            emit(k, frame)

            def take(frames):
                for f in frames:
                    q = pending.pop(f.pts, None)
                    if f.is_corrupt:
                        mark([q] if q is not None else list(pending.values()))
                    elif f.pts in want:
                        kept[want[f.pts]] = convert(f)
                release()

            while pos < end and not stop.is_set():
                p = next(packets, None)
                if p is None:
                    break
                pos += 1
                if pos < start or (p.pts not in want and index.is_disposable(pos, p)):
                    continue
                pending[p.pts] = pos
                report.packets_fed += 1
                try:
                    take(codec.decode(p))
                except av.FFmpegError:
                    mark(list(pending.values()))
            try:
                take(codec.decode(None))
            except av.FFmpegError:
                mark(list(pending.values()))
            codec.flush_buffers()
            release(everything=True)  # packets that never gave a frame: their frames are simply missing
            if damaged:
                packets = None
        return report
    finally:
        container.close()


def _seek(container, stream, index, start: int, report: WorkerReport):
    """Position the demuxer on packet `start` (a keyframe): seek by its decode time, then read up to it;
    if the seek lands past it (a container that seeks by presentation time), read from the beginning."""
    target = int(index.dts[start])
    for attempt in (target, None):
        if attempt is not None and start > 0:
            container.seek(attempt, stream=stream, backward=True, any_frame=False)
            report.seeks += 1
        else:
            container.seek(0)
        packets = _packets(container, stream)
        for p in packets:
            if p.dts == target and p.pts == int(index.pts[start]):
                return _chain(p, packets), start - 1
            if p.dts is not None and p.dts > target:
                break
    raise VideoXLError(f"cannot find packet {start} of the video again after seeking (did the file change?)")


def _chain(first, rest):
    yield first
    yield from rest


@dataclass(frozen=True)
class Engine:
    """What one worker decodes with: its kind ("pyav", "nvdec"), how it opens the file, how it converts a frame
    for the model, and FFmpeg threads inside its decoder."""
    kind: str
    open_container: Callable
    convert: Callable
    threads: int = 1


class JobReader:
    """Runs `decode_jobs` on one thread per engine (at most one per run) over the runs of `jobs` and yields
    (frame numbers, frames) batches in order. Engines of two kinds (NVDEC sessions and CPU decoders) share the
    queue: each takes the next run when it is free, so the faster does more."""

    def __init__(self, probe: Probe, jobs: list[Job], engines: list[Engine], stack: Callable,
                 on_damage: str = "error", cancel=None):
        self.runs = chain(jobs)
        self.cancel = cancel  # a videoxl.cancel.Cancel: the decoding threads stop on it, the consumer raises
        self.engines = engines[:max(1, len(self.runs))]
        self.workers = len(self.engines)
        self.probe, self.stack, self.on_damage = probe, stack, on_damage
        self.reports: list[WorkerReport] = []
        self.missing: list[int] = []  # frames lost at the end of the file (truncation)
        self.skipped: list[int] = []  # damaged frames dropped because on_damage="skip"

    def batches(self, size: int) -> Iterator[tuple[list[int], object]]:
        frames: dict[int, object] = {}
        done = threading.Condition()
        finished, errors = [0], []
        stop = Either(threading.Event(), self.cancel)
        reports = [WorkerReport() for _ in range(self.workers)]
        handed, hand = [0], threading.Lock()

        def take():
            with hand:
                if handed[0] == len(self.runs):
                    return None
                handed[0] += 1
                return self.runs[handed[0] - 1]

        def emit(k, frame):
            with done:
                frames[k] = frame
                done.notify_all()

        def work(i):
            try:
                e = self.engines[i]
                reports[i] = decode_jobs(self.probe, take, e.convert, emit, stop, e.open_container, e.threads)
            except BaseException as e:  # raised in the consumer
                errors.append(e)
            finally:
                with done:
                    finished[0] += 1
                    done.notify_all()

        workers = [threading.Thread(target=work, args=(i,), daemon=True, name=f"videoxl-decode-{i}")
                   for i in range(self.workers)]
        for w in workers:
            w.start()
        order = sorted(k for run in self.runs for job in run for k in job.frames)
        numbers, batch = [], []
        try:
            for pos, k in enumerate(order):
                with done:
                    while k not in frames and finished[0] < len(workers) and not errors:
                        done.wait(CANCEL_POLL_S)
                        check(self.cancel)
                    if errors:
                        raise errors[0]
                    if k not in frames:
                        done.wait_for(lambda: finished[0] == len(workers))
                        if errors:
                            raise errors[0]
                if k not in frames:
                    if self._lost(k, order[pos:], frames):
                        break
                    continue
                numbers.append(k)
                batch.append(frames.pop(k))
                if len(batch) == size:
                    yield numbers, self.stack(batch)
                    numbers, batch = [], []
            if batch:
                yield numbers, self.stack(batch)
        finally:
            stop.set()
            for w in workers:
                w.join()
            self.reports = reports

    def packets_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for engine, report in zip(self.engines, self.reports):
            out[engine.kind] = out.get(engine.kind, 0) + report.packets_fed
        return out

    def _lost(self, k: int, rest: list[int], frames: dict) -> bool:
        """Frame k was not decoded (all workers are done). True: the file ends here, stop."""
        later = [j for j in rest[1:] if j in frames]
        if not later:
            self.missing = list(rest)
            return True
        if self.on_damage != "skip":
            t = k / self.probe.fps
            raise VideoXLError(f"corrupt video: frame {k} (at {t:.1f} s) could not be decoded cleanly, but frame "
                               f"{later[0]} after it could: {self.probe.path} (pass on_damage='skip' to drop "
                               f"damaged frames and read on)")
        self.skipped.append(k)
        return False


def keyframe_jobs(probe: Probe, frames: list[int]) -> tuple[list[Job], dict[int, int], float]:
    """Approximate mode: each sampled frame is replaced by the keyframe nearest in time. Returns one job per
    keyframe used, the substitution, and the largest error in seconds."""
    index = probe.index
    keys = np.flatnonzero(index.key)
    key_frames = np.sort(index.frame_of[keys])
    times = np.array([index.frame_pts(int(k)) for k in key_frames])
    sub, worst = {}, 0.0
    for k in frames:
        t = index.frame_pts(k)
        j = int(np.argmin(np.abs(times - t)))
        sub[k] = int(key_frames[j])
        worst = max(worst, float(abs(times[j] - t) * probe.time_base))
    jobs = sorted({int(index.packet_of[v]) for v in sub.values()})
    return [Job(p, p, [int(index.frame_of[p])]) for p in jobs], sub, worst


def cpu_convert(rotation_ok: Callable[[int], None]):
    """A software frame -> uint8 384x384x3, pixel for pixel what the reference path gives: FFmpeg's RGB
    conversion at full size, then PIL bicubic (the processor's resize). A rotation tag turns the frame first."""
    def convert(frame) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24")
        turns = rotation_ok(frame.rotation)
        return resize_frame(np.rot90(rgb, turns) if turns else rgb)

    return convert
