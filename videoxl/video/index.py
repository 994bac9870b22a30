"""What a video file holds before anything is decoded: its packets, and which of them sampling needs.

`probe` reads the container once, without decoding: every packet's pts in decode order, which packets are
keyframes, and (H.264) which frames no other frame refers to. Frame n of the video is the packet with the
n-th smallest pts, which is the n-th frame a full sequential decode returns; `plan` then turns the sampled
frame numbers into decode jobs, one per keyframe that starts a needed stretch, each ending at the last packet
it must feed. Decoders match output frames to frame numbers by pts, so a wrong frame cannot pass unnoticed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from videoxl.errors import VideoXLError

VFR_TOLERANCE = 0.1  # a gap between frames more than 10% off the median one makes the file variable-rate


@dataclass
class PacketIndex:
    pts: np.ndarray  # int64 [n], decode order
    dts: np.ndarray  # int64 [n], decode order (seek targets: MP4 seeks by decode time)
    key: np.ndarray  # bool [n]
    # bool [n]: no later frame refers to it, so it may be left undecoded; None: not read yet (an index from MP4
    # sample tables, mp4index.py): the decoders read it from each packet's NAL headers (`is_disposable`)
    disposable: np.ndarray | None
    frame_of: np.ndarray  # int64 [n]: frame number (presentation order) of packet i
    packet_of: np.ndarray  # int64 [n]: packet (decode order) of frame number k
    length_size: int = 0  # H.264 in MP4/MKV: bytes of each NAL unit's length prefix (0: not such a stream)

    @classmethod
    def build(cls, pts, dts, key, disposable) -> "PacketIndex | None":
        pts = np.asarray(pts, dtype=np.int64)
        order = np.argsort(pts, kind="stable")
        if len(pts) == 0 or np.any(np.diff(pts[order]) == 0):
            return None  # repeated pts: frames cannot be told apart by time
        frame_of = np.empty_like(order)
        frame_of[order] = np.arange(len(order))
        return cls(pts, np.asarray(dts, dtype=np.int64), np.asarray(key, dtype=bool),
                   None if disposable is None else np.asarray(disposable, dtype=bool), frame_of, order)

    def is_disposable(self, pos: int, packet) -> bool:
        if self.disposable is not None:
            return bool(self.disposable[pos])
        return self.length_size > 0 and not self.key[pos] and nal_disposable(memoryview(packet), self.length_size)

    def __len__(self) -> int:
        return len(self.pts)

    def frame_pts(self, k: int) -> int:
        return int(self.pts[self.packet_of[k]])

    def is_vfr(self) -> bool:
        gaps = np.diff(np.sort(self.pts))
        if len(gaps) < 2:
            return False
        median = float(np.median(gaps))
        return bool(np.any(np.abs(gaps - median) > VFR_TOLERANCE * median))


@dataclass
class Probe:
    path: str
    codec: str
    width: int
    height: int
    fps: float  # average rate: the reference places frame k at k / fps seconds
    total: int  # frame count from the header (what the reference samples from), else the packet count
    time_base: Fraction
    start_pts: int
    index: PacketIndex | None  # None: packets without usable pts (decode by counting frames), or not scanned
    scan_s: float = 0.0
    scanned: bool = True

    def seconds(self, k: int) -> float:
        """Real presentation time of frame k (variable-rate files), from the first frame."""
        return float((self.index.frame_pts(k) - self.start_pts) * self.time_base)


@dataclass
class Job:
    """Decode packets start..end (decode order) from a keyframe, keeping `frames` (frame numbers)."""
    start: int
    end: int
    frames: list[int] = field(default_factory=list)

    @property
    def packets(self) -> int:
        return self.end - self.start + 1


def nal_disposable(data: memoryview, length_size: int) -> bool:
    """H.264 in MP4/MKV (length-prefixed NAL units): a frame whose every slice has nal_ref_idc == 0 is never
    used as a reference, so a decoder may skip it without changing any other frame."""
    i, n, slices = 0, len(data), 0
    while i + length_size < n:
        size = int.from_bytes(data[i:i + length_size], "big")
        header = data[i + length_size]
        if header & 0x1F in (1, 5):  # coded slice (non-IDR, IDR)
            slices += 1
            if header >> 5:
                return False
        i += length_size + size
    return slices > 0


def probe(container, path: str, header_only: bool = False) -> Probe:
    """Read the packet index of the first video stream (raises VideoXLError on unreadable input). With
    `header_only`, stop at the header when it records a frame count (the index is then None, `scanned` False)."""
    import time

    import av

    t0 = time.perf_counter()
    if not container.streams.video:
        raise VideoXLError(f"file has no video stream: {path}")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if fps <= 0:
        raise VideoXLError(f"video has no frame rate, cannot place timestamps: {path}")
    extradata = stream.codec_context.extradata or b""
    length_size = (extradata[4] & 3) + 1 if stream.codec_context.name == "h264" and extradata[:1] == b"\x01" \
        else 0  # 0: Annex B or another codec, decode every frame
    if header_only and stream.frames > 0:
        return Probe(path, stream.codec_context.name, stream.codec_context.width, stream.codec_context.height, fps,
                     stream.frames, stream.time_base, 0, None, 0.0, scanned=False)
    pts, dts, key, disposable, usable = [], [], [], [], True
    try:
        for p in container.demux(stream):
            if not p.size:
                continue
            if p.pts is None or p.dts is None:
                usable = False
            pts.append(p.pts if p.pts is not None else 0)
            dts.append(p.dts if p.dts is not None else 0)
            key.append(p.is_keyframe)
            disposable.append(length_size > 0 and not p.is_keyframe and nal_disposable(memoryview(p), length_size))
    except av.FFmpegError:
        pass  # a damaged tail: the packets before it are indexed, the decoders report what is missing
    if not pts:
        raise VideoXLError(f"video has no frames: {path}")
    index = PacketIndex.build(pts, dts, key, disposable) if usable and key[0] else None
    total = stream.frames if stream.frames > 0 else len(pts)
    return Probe(path, stream.codec_context.name, stream.codec_context.width, stream.codec_context.height, fps,
                 total, stream.time_base, int(min(pts)) if index is not None else 0, index,
                 time.perf_counter() - t0)


def plan(index: PacketIndex, frames: list[int]) -> list[Job]:
    """One job per keyframe that starts a needed stretch, in decode order. A frame shown before its keyframe
    (an open GOP's leading B-frames) starts at the keyframe before, which its references follow."""
    keys = np.flatnonzero(index.key)
    jobs: dict[int, Job] = {}
    for k in frames:
        packet = int(index.packet_of[k])
        j = int(np.searchsorted(keys, packet, side="right")) - 1
        while j > 0 and index.pts[packet] < index.pts[keys[j]]:
            j -= 1
        start = int(keys[j])
        job = jobs.setdefault(start, Job(start, packet))
        job.end = max(job.end, packet)
        job.frames.append(k)
    return [jobs[s] for s in sorted(jobs)]


def split(jobs: list[Job], parts: int, index: PacketIndex) -> list[list[Job]]:
    """Cut the job list into at most `parts` consecutive runs of about equal decoding work (frames that must
    be decoded: disposable packets that are not kept are skipped)."""
    if parts <= 1 or len(jobs) <= 1:
        return [jobs] if jobs else []
    if index.disposable is None:  # not known before decoding: every packet counts
        work = np.cumsum([j.packets + len(j.frames) for j in jobs])
    else:
        work = np.cumsum([int(np.count_nonzero(~index.disposable[j.start:j.end + 1])) + len(j.frames)
                          for j in jobs])
    bounds = np.searchsorted(work, work[-1] * np.arange(1, parts) / parts, side="left") + 1
    out, prev = [], 0
    for b in list(bounds) + [len(jobs)]:
        if b > prev:
            out.append(jobs[prev:b])
            prev = b
    return out
