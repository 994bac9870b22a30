"""How fast can a KV cache entry come off this machine's disk? Raw reads against the cache's reader.

    python bench/kv_disk_read.py [--gib 4] [--dir /tmp] [--out kv_disk_read.json]

Writes a safetensors file of random bf16 "KVs" (`--gib`), then for each variant drops the file from the page
cache (posix_fadvise DONTNEED after fsync) and reads it whole: buffered preads with 1..16 threads, O_DIRECT
preads with 1..16 threads (aligned buffers), and `kv_disk.read_safetensors` to the GPU with 4, 8 and 12 reader threads (cold and warm).
GB/s = file bytes / wall time.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from videoxl.cache import disk as kv_disk  # noqa: E402
from videoxl.cache.disk import read_safetensors  # noqa: E402

CHUNK = 32 << 20


def drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path, threads, direct):
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    chunks = list(range(0, size - size % 4096 if direct else size, CHUNK))

    def work(w):
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        for a in chunks[w::threads]:
            n = min(CHUNK, size - a)
            if direct:
                n -= n % 4096
            os.preadv(fd, [memoryview(buf)[:n]], a)
    ts = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    os.close(fd)
    return size / dt / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--out", default="kv_disk_read.json")
    args = ap.parse_args()
    from safetensors.torch import save_file

    path = os.path.join(args.dir, "kv_read_bench.safetensors")
    n = int(args.gib * 2**30 / 2 / 56)
    save_file({f"l{i}": torch.randn(n, dtype=torch.bfloat16) for i in range(56)}, path)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "bytes": os.path.getsize(path)}
    for direct in (False, True):
        for threads in (1, 4, 8, 16):
            drop(path)
            res[f"{'direct' if direct else 'buffered'}_{threads}t_gbps"] = round(raw_read(path, threads, direct), 2)
            print({k: v for k, v in res.items() if k.endswith("gbps")}, flush=True)
    if torch.cuda.is_available():
        shipped = kv_disk.READERS
        for readers in sorted({4, 8, 12, shipped}):
            kv_disk.READERS, staging = readers, []
            for case in ("cold", "warm"):
                if case == "cold":
                    drop(path)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                read_safetensors(path, torch.device("cuda"), staging)
                torch.cuda.synchronize()
                res[f"reader_{readers}t_{case}_gbps"] = round(res["bytes"] / (time.perf_counter() - t0) / 1e9, 2)
        kv_disk.READERS = shipped
    os.remove(path)
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
