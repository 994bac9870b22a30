"""The packet index of an MP4/MOV file from its sample tables, without reading the packets.

`index.probe` demuxes every packet to learn its timestamps: an hour of 1080p30 is 108,000 packets and about
2 s on one core, all before the first frame is decoded. An MP4 file already lists them in its `moov` box: per
sample its decode-time delta (`stts`), composition offset (`ctts`) and whether it is a sync sample (`stss`), a
few MB of tables for an hour. FFmpeg's demuxer reads the same tables, then shifts the times by the edit list;
rather than re-derive that rule, the shift is taken from the first packets FFmpeg demuxes, and those packets
must then agree with the tables one for one, or the caller falls back to the full scan.

What the tables do not say is which H.264 frames are disposable (no other frame refers to them; decoding skips
them when they are not sampled). That needs each packet's NAL headers, so it is left to the decoders, which read
every packet they feed anyway (`PacketIndex.is_disposable`).
"""
from __future__ import annotations

import dataclasses
import struct
import time

import numpy as np

from videoxl.video.index import PacketIndex, Probe, probe

CHECK_PACKETS = 64  # packets demuxed by FFmpeg that must match the tables


class NotParsed(Exception):
    """The file is not an MP4 this reader understands (fragmented, no video track, odd boxes): scan it instead."""


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of the boxes in data[start:end]."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, i)
        head = 8
        if size == 1:
            size, head = struct.unpack_from(">Q", data, i + 8)[0], 16
        elif size == 0:
            size = end - i
        if size < head or i + size > end:
            raise NotParsed(f"bad box {kind!r}")
        yield kind, i + head, i + size
        i += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for k, s, e in _boxes(data, start, end):
        if k == kind:
            return s, e
    return None


def read_moov(path: str) -> bytes:
    """The `moov` box's bytes, found by walking the top-level boxes (it may follow a large `mdat`)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size_total, pos = f.tell(), 0
        while pos + 8 <= size_total:
            f.seek(pos)
            head = f.read(16)
            size, kind = struct.unpack_from(">I4s", head, 0)
            header = 8
            if size == 1:
                size, header = struct.unpack_from(">Q", head, 8)[0], 16
            elif size == 0:
                size = size_total - pos
            if size < header:
                raise NotParsed("bad top-level box")
            if kind == b"moov":
                f.seek(pos + header)
                return f.read(size - header)
            if kind == b"moof":
                raise NotParsed("fragmented MP4")
            pos += size
    raise NotParsed("no moov box")


def _video_stbl(moov: bytes) -> tuple[int, int]:
    """The sample table of the first video track (the stream FFmpeg lists first among video streams)."""
    for kind, s, e in _boxes(moov):
        if kind != b"trak":
            continue
        mdia = _child(moov, s, e, b"mdia")
        hdlr = mdia and _child(moov, *mdia, b"hdlr")
        if hdlr and moov[hdlr[0] + 8:hdlr[0] + 12] == b"vide":
            minf = _child(moov, *mdia, b"minf")
            stbl = minf and _child(moov, *minf, b"stbl")
            if stbl:
                return stbl
            raise NotParsed("video track without a sample table")
    raise NotParsed("no video track")


def _full(moov: bytes, box: tuple[int, int] | None) -> tuple[int, int, int]:
    """(version, entry count, first entry's offset) of a full box with a count."""
    s, _ = box
    version = moov[s]
    return version, struct.unpack_from(">I", moov, s + 4)[0], s + 8


def sample_tables(moov: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per sample in decode order: dts, pts (before the edit-list shift), sync flag, size."""
    stbl = _video_stbl(moov)
    find = lambda kind: _child(moov, *stbl, kind)  # noqa: E731
    stsz, stts = find(b"stsz"), find(b"stts")
    if stsz is None or stts is None:
        raise NotParsed("no stsz/stts")
    s = stsz[0]
    fixed, n = struct.unpack_from(">II", moov, s + 4)
    sizes = np.full(n, fixed, dtype=np.int64) if fixed else \
        np.frombuffer(moov, dtype=">u4", count=n, offset=s + 12).astype(np.int64)
    _, count, at = _full(moov, stts)
    pairs = np.frombuffer(moov, dtype=">u4", count=2 * count, offset=at).reshape(-1, 2).astype(np.int64)
    deltas = np.repeat(pairs[:, 1], pairs[:, 0])
    if len(deltas) != n:
        raise NotParsed("stts does not cover every sample")
    dts = np.concatenate([[0], np.cumsum(deltas)[:-1]]).astype(np.int64)
    offsets = np.zeros(n, dtype=np.int64)
    ctts = find(b"ctts")
    if ctts is not None:
        version, count, at = _full(moov, ctts)
        raw = np.frombuffer(moov, dtype=">u4", count=2 * count, offset=at).reshape(-1, 2)
        values = raw[:, 1].astype(np.int64) if version == 0 else raw[:, 1].view(">i4").astype(np.int64)
        offsets = np.repeat(values, raw[:, 0].astype(np.int64))
        if len(offsets) != n:
            raise NotParsed("ctts does not cover every sample")
    key = np.ones(n, dtype=bool)
    stss = find(b"stss")
    if stss is not None:
        _, count, at = _full(moov, stss)
        key[:] = False
        key[np.frombuffer(moov, dtype=">u4", count=count, offset=at).astype(np.int64) - 1] = True
    return dts, dts + offsets, key, sizes


def mp4_index(path: str, container, stream) -> PacketIndex:
    """The PacketIndex `index.probe` would build, from the tables (`container`: PyAV's, opened on `path`;
    `stream`: its first video stream). Raises NotParsed when the tables and FFmpeg's first packets disagree."""
    if container.format.name.split(",")[0] not in ("mov", "mp4", "m4a", "3gp", "3g2", "mj2"):
        raise NotParsed("not an MP4/MOV container")
    dts, pts, key, sizes = sample_tables(read_moov(path))
    keep = sizes > 0  # the scan skips empty packets too
    dts, pts, key = dts[keep], pts[keep], key[keep]
    shift = None
    for i, p in enumerate(container.demux(stream)):
        if i >= min(CHECK_PACKETS, len(dts)):
            break
        if not p.size:
            raise NotParsed("an empty packet among the first")
        if p.pts is None or p.dts is None:
            raise NotParsed("packets without timestamps")
        shift = p.dts - int(dts[0]) if shift is None else shift
        if (p.dts - shift, p.pts - shift, bool(p.is_keyframe)) != (int(dts[i]), int(pts[i]), bool(key[i])):
            raise NotParsed(f"packet {i} differs from the sample table")
    if shift is None or not key[0]:
        raise NotParsed("no packets")
    extradata = stream.codec_context.extradata or b""
    length_size = (extradata[4] & 3) + 1 if stream.codec_context.name == "h264" and extradata[:1] == b"\x01" \
        else 0
    index = PacketIndex.build(pts + shift, dts + shift, key, None)
    if index is None:
        raise NotParsed("repeated timestamps")
    index.length_size = length_size
    return index


def scan(path: str, header: Probe) -> Probe:
    """`header` (index.probe's header-only result) with its packet index: from the sample tables where they
    can be trusted, else by index.probe's full scan."""
    import av

    t0 = time.perf_counter()
    try:
        with av.open(path) as c:
            index = mp4_index(path, c, c.streams.video[0])
    except (NotParsed, av.FFmpegError, OSError, struct.error, ValueError, IndexError):
        with av.open(path) as c:
            return probe(c, path)
    return dataclasses.replace(header, index=index, start_pts=int(index.pts.min()),
                               scan_s=time.perf_counter() - t0, scanned=True)
