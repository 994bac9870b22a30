"""The on-disk side of the video KV cache: one folder per entry, `kv.safetensors` (every layer's K and V of the
video prefix) and `manifest.json` (the key, the prefix prompt, the layout, per-tensor checksums).

An entry is written into a temporary folder, fsynced and renamed into place, so a reader (another process, or
this one after a crash) sees no entry or a whole one. It is verified when read (format, key, file size, every
tensor's checksum); anything wrong and the folder is removed and the caller rebuilds. Writes run on a
background thread: a full disk leaves the entry in memory only and is logged, never raised into a question.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading

import torch

from videoxl.errors import VideoXLError

FORMAT_VERSION = 1
log = logging.getLogger("videoxl.cache.disk")


def checksum(t: torch.Tensor) -> int:
    """Sum of a tensor's bytes read as int64 words, wrapping: integer addition modulo 2**64 gives the same result
    in any order, so on any device, at memory speed. Catches corrupted or truncated files without hashing
    gigabytes on the CPU (not a defence against tampering)."""
    b = t.contiguous().reshape(-1).view(torch.uint8)
    if b.numel() % 8 == 0:
        b = b.view(torch.int64)
    return int(b.sum(dtype=torch.int64))


class KVDisk:
    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise VideoXLError(f"cannot create the KV cache directory {directory}: {e.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise VideoXLError(f"the KV cache directory is not writable: {directory}")
        self.writes, self.rejected, self.slow_reads = 0, 0, 0
        self._staging: list[torch.Tensor] = []  # pinned read buffers, made at the first read to a GPU
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._writer, name="videoxl-kv-writer", daemon=True).start()

    def folder(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.folder(name), "manifest.json"))

    # ---- writing ----
    def submit(self, name: str, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Write an entry on the background thread (`tensors` are CPU copies the caller no longer touches)."""
        self._queue.put((name, manifest, tensors))

    def join(self) -> None:
        self._queue.join()

    def _writer(self) -> None:
        while True:
            name, manifest, tensors = self._queue.get()
            try:
                self.write(name, manifest, tensors)
            except Exception as e:  # the entry stays memory-only
                log.warning("could not write KV cache entry %s: %s", name, e)
            finally:
                self._queue.task_done()

    def write(self, name: str, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        final = self.folder(name)
        if self.has(name):
            return
        tmp = self.folder(f".tmp-{name}-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            data = os.path.join(tmp, "kv.safetensors")
            save_file(tensors, data)
            manifest = dict(manifest, format=FORMAT_VERSION, file_bytes=os.path.getsize(data),
                            checksums={n: checksum(t) for n, t in tensors.items()})
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f)
            for file in (data, os.path.join(tmp, "manifest.json")):
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if os.path.isdir(final) and not self.has(name):
                shutil.rmtree(final, ignore_errors=True)  # a folder without a manifest: a write that died
            os.rename(tmp, final)  # fails if another process put a whole entry there meanwhile: kept
            self.writes += 1
        except OSError:
            if not self.has(name):
                raise  # else another process wrote the same entry first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- reading ----
    def read(self, name: str, key: dict, device: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(manifest, tensors on `device`) of a verified entry with this key, or None (absent or rejected)."""
        if not self.has(name):
            return None
        try:
            return self._read(name, key, device)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # not the entry's fault
        except Exception as e:  # whatever is wrong with the files, the answer is to rebuild, not to fail
            self.reject(name, e)
            return None

    def reject(self, name: str, why) -> None:
        self.rejected += 1
        log.warning("KV cache entry %s rejected (%s); it will be rebuilt", self.folder(name), why)
        shutil.rmtree(self.folder(name), ignore_errors=True)

    def _read(self, name: str, key: dict, device: str):
        folder = self.folder(name)
        with open(os.path.join(folder, "manifest.json")) as f:
            m = json.load(f)
        if m.get("format") != FORMAT_VERSION or m.get("key") != json.loads(json.dumps(key)):
            raise ValueError("manifest is for another key or format")
        data = os.path.join(folder, "kv.safetensors")
        if os.path.getsize(data) != m["file_bytes"]:
            raise ValueError("file size differs from the manifest")
        try:
            tensors = read_safetensors(data, torch.device(device), self._staging)
        except (ValueError, OSError, MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:  # a fault of the fast reader, not of the file: safetensors' own loader
            from safetensors.torch import load_file

            self.slow_reads += 1
            log.warning("fast KV read failed (%s: %s); reading with safetensors", type(e).__name__, e)
            tensors = load_file(data, device=str(device))
        bad = [n for n, c in m["checksums"].items() if n not in tensors or checksum(tensors[n]) != c]
        if bad or len(tensors) != len(m["checksums"]):
            raise ValueError(f"checksum mismatch in {bad[:3] or 'the tensor list'}")
        return m, tensors


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}
READ_CHUNK = 16 << 20
READERS = 8  # cold reads are disk-bound at any count; from the page cache 8 threads read 22 GB/s, 4 read 12


def read_safetensors(path: str, device: torch.device, staging: list) -> dict[str, torch.Tensor]:
    """A safetensors file of KVs -> tensors on `device`, read by a few threads straight into one flat buffer
    (on a GPU through reused pinned chunks, copies overlapping reads), as views of it. safetensors' own loader
    goes tensor by tensor through pageable memory; a disk hit is only worth having if it is fast."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < min(size, 1 << 26):
            raise ValueError("not a safetensors file")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    total = max((v["data_offsets"][1] for v in header.values()), default=0)
    if base + total != size or any(v["dtype"] not in DTYPES for v in header.values()):
        raise ValueError("safetensors header does not match the file")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    inference = torch.is_inference_mode_enabled()  # the reader threads write `flat` in the caller's mode
    chunks = [(a, min(a + READ_CHUNK, total)) for a in range(0, total, READ_CHUNK)]
    cuda = device.type == "cuda"
    if cuda and not staging:
        staging += [torch.empty(READ_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2 * READERS)]
    fd = os.open(path, os.O_RDONLY)

    def reader(worker: int) -> None:
        with torch.inference_mode(inference):
            read_share(worker)

    def read_share(worker: int) -> None:
        if cuda:
            torch.cuda.set_device(device)  # this thread's copies go to the store's GPU
        stream = torch.cuda.Stream(device) if cuda else None
        done = [None, None]
        for k, (a, b) in enumerate(chunks[worker::READERS]):
            if not cuda:
                _pread_into(fd, memoryview(flat[a:b].numpy()), base + a)
                continue
            slot = k % 2
            if done[slot] is not None:
                done[slot].synchronize()  # the copy out of this buffer has finished
            buf = staging[2 * worker + slot][:b - a]
            _pread_into(fd, memoryview(buf.numpy()), base + a)
            with torch.cuda.stream(stream):
                flat[a:b].copy_(buf, non_blocking=True)
                done[slot] = torch.cuda.Event()
                done[slot].record(stream)
        if stream is not None:
            stream.synchronize()

    try:
        threads = [threading.Thread(target=reader, args=(w,)) for w in range(min(READERS, len(chunks)))]
        errors = []
        for t in threads:
            t.run = _catching(t.run, errors)
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        os.close(fd)
    out = {}
    for name, v in header.items():
        a, b = v["data_offsets"]
        out[name] = flat[a:b].view(DTYPES[v["dtype"]]).view(v["shape"])
    return out


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise ValueError("the file ended early")
        view, offset = view[got:], offset + got


def _catching(run, errors: list):
    def wrapped():
        try:
            run()
        except BaseException as e:  # handed to the caller
            errors.append(e)
    return wrapped
