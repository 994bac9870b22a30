"""The CPU decoding path against the machine's per-core ceiling (issue 19, item 3).

    python bench/cpu_ceiling.py FILE [--procs N] [--sample-fps 1] [--out ceiling.json]

ceiling-all: N processes (default: one per core), each one single-threaded FFmpeg decoder over a keyframe-aligned
  Nth of the file, every packet fed, nothing converted: what the cores can decode.
ceiling-same: the same, but each process feeds exactly the packets our path feeds for this sampling (its share
  of `plan` + `split`, non-reference frames that are not sampled skipped): the ceiling for our work.
ours: `open_video(...)` read to the end (decoder threads in one process, RGB conversion + resize of the
  sampled frames, the packet index scan before decoding), packets fed / wall.
Rates are packets fed per second; `ours / ceiling-same` is the share of the ceiling our path reaches.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from videoxl.video.index import plan, probe, split  # noqa: E402
from videoxl.video.sources import open_video, sample_frame_indices  # noqa: E402


def _decode_share(path, jobs, feed_all, barrier, out):
    """One process: decode packets jobs[0].start .. jobs[-1].end on one single-threaded decoder."""
    import av

    with av.open(path) as c:
        info = probe(c, path)
    index = info.index
    want = {int(index.pts[index.packet_of[k]]) for j in jobs for k in j.frames}
    ranges = [(j.start, j.end) for j in jobs]
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_count = 1
        if ranges[0][0] > 0:
            c.seek(int(index.dts[ranges[0][0]]), stream=s, backward=True, any_frame=False)
        packets = (p for p in c.demux(s) if p.size)
        pos, fed, r = -1, 0, 0
        barrier.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        first = None
        for p in packets:
            if first is None:  # where the seek landed, in packet numbers
                pos = int(next(i for i in range(len(index)) if index.dts[i] == p.dts)) - 1 if ranges[0][0] else -1
                first = pos
            pos += 1
            while r < len(ranges) and pos > ranges[r][1]:
                r += 1
            if r == len(ranges):
                break
            if pos < ranges[r][0] or (not feed_all and index.disposable[pos] and p.pts not in want):
                continue
            fed += 1
            s.codec_context.decode(p)
        s.codec_context.decode(None)
        out.put((fed, time.perf_counter() - t0, time.process_time() - c0))


def ceiling(path, procs, sampled=None):
    """Packets/s of `procs` single-threaded decoders in separate processes. sampled=None: every packet."""
    with __import__("av").open(path) as c:
        info = probe(c, path)
    index = info.index
    if sampled is None:
        keys = [int(k) for k in index.key.nonzero()[0]] + [len(index)]
        jobs = [type(plan(index, [0])[0])(a, b - 1, []) for a, b in zip(keys, keys[1:])]
        parts = split(jobs, procs, index)
    else:
        parts = split(plan(index, sampled), procs, index)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(parts)), ctx.Queue()
    ps = [ctx.Process(target=_decode_share, args=(path, part, sampled is None, barrier, out)) for part in parts]
    for p in ps:
        p.start()
    got = [out.get() for _ in ps]
    for p in ps:
        p.join()
    fed, wall, cpu = sum(g[0] for g in got), max(g[1] for g in got), sum(g[2] for g in got)
    return {"procs": len(parts), "packets_fed": fed, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "packets_per_s": round(fed / wall, 1), "packets_per_cpu_s": round(fed / cpu, 1)}


def ours(path, sample_fps, workers=None):
    t0, c0 = time.perf_counter(), time.process_time()
    stream = open_video(path, max_num_frames=10**9, sample_fps=sample_fps, decoder="pyav", workers=workers)
    n = sum(len(b) for b in stream.batches(96))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = stream.stats
    return {"frames": n, "packets_fed": st["video_frames_read"], "wall_s": round(wall, 3),
            "scan_s": st.get("video_scan_s"), "workers": st.get("video_workers"),
            "threads_per_decoder": st.get("video_threads_per_decoder"),
            "cpu_s": round(cpu, 3), "packets_per_s": round(st["video_frames_read"] / wall, 1),
            "packets_per_cpu_s": round(st["video_frames_read"] / cpu, 1)}


def measure(path, procs, sample_fps, workers=None):
    with __import__("av").open(path) as c:
        info = probe(c, path)
    sampled = sample_frame_indices(info.total, info.fps, 10**9, sample_fps)
    res = {"file": os.path.basename(path), "cores": os.cpu_count(), "sample_fps": sample_fps,
           "ceiling_all": ceiling(path, procs), "ceiling_same": ceiling(path, procs, sampled),
           "ours": ours(path, sample_fps, workers)}
    for rate in ("packets_per_s", "packets_per_cpu_s"):  # wall: the machine's own; CPU time: under load too
        res[f"ours_share_of_ceiling_same_{rate}"] = round(res["ours"][rate] / res["ceiling_same"][rate], 3)
        res[f"ours_share_of_ceiling_all_{rate}"] = round(res["ours"][rate] / res["ceiling_all"][rate], 3)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    ap.add_argument("--sample-fps", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out")
    a = ap.parse_args()
    res = measure(a.file, a.procs, a.sample_fps, a.workers)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
