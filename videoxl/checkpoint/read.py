"""safetensors files -> tensors on the model's device, read with plain positioned reads.

safetensors' own reader hands each tensor out of a memory map as a CPU tensor; `.to("cuda")` then copies it from
pageable memory, which the driver stages once more through a buffer of its own, under its locks, on the calling
thread. Here each tensor's bytes are read (`os.preadv`, which drops the GIL) straight into one of two pinned
buffers per thread, and copied to the GPU from there asynchronously on the thread's own stream while the next
buffer fills: one CPU copy per byte instead of three, no page faults, and the copies never touch the legacy
default stream on which NVDEC's pictures are mapped (`videoxl chat` decodes the first question's frames beside
the load). On the CPU the bytes are read straight into the tensor.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}} with offsets counted from byte 8 + N.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

import torch

from videoxl.devices import on_device
from videoxl.errors import VideoXLError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
HEADER_LIMIT = 100 << 20  # safetensors' own bound on the header
CHUNK = 32 << 20  # bytes per pinned buffer: two per thread, 8 threads = 512 MiB of pinned memory while loading


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are in its file (absolute offsets) and what they hold."""
    path: str
    name: str
    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def header(path: str) -> dict[str, Entry]:
    """name -> Entry for every tensor of a safetensors file; a malformed header is one clear error."""
    def bad(why: str):
        return VideoXLError(f"unreadable safetensors file {path}: {why}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise bad("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(HEADER_LIMIT, size - 8):
                raise bad(f"header length {n} does not fit the file ({size} bytes)")
            meta = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(str(e).splitlines()[0][:200]) from None
    if not isinstance(meta, dict):
        raise bad("its header is not a JSON object")
    out = {}
    for name, m in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[m["dtype"]], tuple(int(s) for s in m["shape"]), m["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry or an unknown dtype") from None
        count = 1
        for s in shape:
            count *= s
        if not (0 <= begin <= end <= size - 8 - n) or end - begin != count * dtype.itemsize:
            raise bad(f"tensor {name!r}'s byte range does not match its shape or the file")
        out[name] = Entry(path, name, dtype, shape, 8 + n + begin, 8 + n + end)
    return out


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise VideoXLError(f"unreadable safetensors file {path}: it ended early (truncated?)")
        got += k


class Reader:
    """One loading thread's files, pinned buffers and CUDA stream. `read` returns the tensor on `device` in the
    file's dtype; on a GPU its copy may still be in flight until `wait` (or `close`) returns."""

    def __init__(self, device: torch.device, staged: bool | None = None):
        self.device = device
        self.files: dict[str, int] = {}
        self.cuda = device.type == "cuda"
        self.staged = self.cuda if staged is None else staged  # staged on the CPU: the tests' way to run that path
        if self.staged:
            self.buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
            self.done = [None, None]  # the event after which each buffer may be refilled
            self.turn = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(device)

    def _fd(self, path: str) -> int:
        if path not in self.files:
            try:
                self.files[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise VideoXLError(f"unreadable safetensors file {path}: {e.strerror}") from None
        return self.files[path]

    def read(self, entry: Entry) -> torch.Tensor:
        fd = self._fd(entry.path)
        # allocated on the device's current (default) stream, so the allocator never hands this memory to another
        # tensor while the copy below is still writing it (nothing is freed before `wait`)
        out = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
        try:
            if not self.staged:
                _pread_into(fd, memoryview(out.numpy()), entry.begin, entry.path)
            else:
                for start in range(0, entry.nbytes, CHUNK):
                    k = min(CHUNK, entry.nbytes - start)
                    i, self.turn = self.turn, self.turn ^ 1
                    if self.done[i] is not None:
                        self.done[i].synchronize()  # its previous copy has left the buffer
                    buf = self.buffers[i][:k]
                    _pread_into(fd, memoryview(buf.numpy()), entry.begin + start, entry.path)
                    if not self.cuda:
                        out[start:start + k].copy_(buf)
                        continue
                    with torch.cuda.stream(self.stream):
                        out[start:start + k].copy_(buf, non_blocking=True)
                        self.done[i] = torch.cuda.Event()
                        self.done[i].record(self.stream)
        except OSError as e:
            raise VideoXLError(f"unreadable safetensors file {entry.path}: {e}") from None
        return out.view(entry.dtype).reshape(entry.shape)

    def wait(self) -> None:
        """Every copy this reader queued has landed."""
        if self.cuda:
            self.stream.synchronize()

    def close(self) -> None:
        self.wait()
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def read_all(entries: list[tuple[str, Entry]], device: torch.device, threads: int, keep) -> None:
    """Read every (key, entry) on `threads` threads, largest first from one shared list (a thread that finishes
    early takes the next tensor, whatever its file), and hand each to `keep(key, tensor, reader)` on the
    reading thread. `keep` must call `reader.wait()` before it converts or frees the tensor."""
    todo = sorted(entries, key=lambda e: -e[1].nbytes)
    lock, errors = threading.Lock(), []

    def work():
        reader = Reader(device)
        try:
            with on_device(device):  # kernels launched without a device (`keep`'s quantizers) go to this GPU
                while True:
                    with lock:
                        if errors or not todo:
                            return
                        key, entry = todo.pop(0)
                    keep(key, reader.read(entry), reader)
        except BaseException as e:  # the first error is raised once every thread has stopped
            with lock:
                errors.append(e)
        finally:
            reader.close()

    pool = [threading.Thread(target=work, name=f"videoxl-load-{i}", daemon=True)
            for i in range(max(1, min(threads, len(todo))))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
