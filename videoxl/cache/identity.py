"""Identities the video KV cache is keyed by: a video file's content hash and the model's weights digest.

A file is named by a BLAKE3 hash of its bytes (multi-threaded: several GB/s, where SHA-256 did ~1 GB/s on one
core, in front of every first frame). A hash is remembered per process by the file's stat (device, inode, size,
mtime, ctime), but only for files that had not changed for `SETTLED_NS` when hashing began: file timestamps come
from a coarse clock, so a file rewritten within the same tick could otherwise keep its stat and its old hash
(git's "racily clean" problem). ctime cannot be set back by a user, so restoring mtime does not fool it.

`content_id_soon` starts the hash on a thread: a question about a new file decodes while its hash runs, and
the entry is keyed (stored) only once the hash is done. The lookup waits for the hash only when an entry could
match: a disk cache, or a kept video of the same size.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass

import blake3
import torch

from videoxl.video.sources import IMAGE_EXTENSIONS

PREFIX = "blake3:"
SETTLED_NS = 2 * 10**9  # far above any file system's timestamp tick (Linux: one jiffy, <= 10 ms)


@dataclass(frozen=True)
class VideoRef:
    """A video named by a content id (`content_id(path)`, or a name its caller vouches for), with the file to
    read if its KVs are not cached. `path=None`: answer only from the cache."""

    id: str
    path: str | tuple | None = None  # a tuple: still images, as frames


_content_ids: dict[tuple, str] = {}
_sizes: dict[str, int] = {}  # content id -> bytes hashed: a cheap "could this entry be that file?"
_content_lock = threading.Lock()
_now_ns = time.time_ns  # the clock file timestamps are taken from (a test moves it)


def new_hasher():
    """A hasher for bytes that arrive in pieces (the server hashes uploads as it writes them)."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


def digest_of(h) -> str:
    return PREFIX + h.hexdigest()


def _files(path: str) -> list[tuple[str, str]]:
    """(name hashed, file) pairs: the file itself, or a folder's images in name order."""
    if not os.path.isdir(path):
        return [("", path)]
    names = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return [(name, os.path.join(path, name)) for name in names]


def _stat_key(path: str) -> tuple | None:
    """What must stay the same for a remembered hash to hold, and the newest ctime in it; None if unreadable."""
    try:
        stats = [(name, os.stat(f)) for name, f in _files(path)]
    except OSError:
        return None
    return (path, tuple((n, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for n, s in stats))


def content_id(path: str) -> str | None:
    """BLAKE3 of a file's bytes (a folder of images: of their names and bytes). None for what is not a file
    or folder."""
    path = os.path.abspath(os.fspath(path))
    memo = _stat_key(path)
    if memo is None:
        return None
    with _content_lock:
        if memo in _content_ids:
            return _content_ids[memo]
    started = _now_ns()
    h, size = new_hasher(), 0
    try:
        for name, f in _files(path):
            if name:
                h.update(name.encode() + b"\0")
            h.update_mmap(f)
            size += os.path.getsize(f)
    except OSError:
        return None
    digest = digest_of(h)
    newest = max((s[5] for s in memo[1]), default=0)
    with _content_lock:
        _sizes[digest] = size
        if started - newest >= SETTLED_NS and _stat_key(path) == memo:  # unchanged while it was hashed
            _content_ids[memo] = digest
    return digest


def remember_content_id(path: str, digest: str) -> None:
    """Record a hash computed while the file was written (the server hashes uploads as it receives them)."""
    memo = _stat_key(os.path.abspath(path))
    with _content_lock:
        _content_ids[memo] = digest
        _sizes[digest] = os.path.getsize(path)


def size_of(content: str) -> int | None:
    """The byte count behind a content id hashed in this process; None for one a caller named."""
    return _sizes.get(content)


class PendingId:
    """A content id being computed on a thread (`content_id_soon`)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        try:
            self.size = sum(os.path.getsize(f) for _, f in _files(self.path))
        except OSError:
            self.size = None
        memo = _stat_key(self.path)
        with _content_lock:
            known = _content_ids.get(memo)
        self._id, self._done = known, threading.Event()
        self.span = None  # (start, end) perf_counter times of the hash, when this process ran it
        if known is not None:
            self._done.set()
        else:
            threading.Thread(target=self._run, name="videoxl-hash", daemon=True).start()

    def _run(self):
        t0 = time.perf_counter()
        try:
            self._id = content_id(self.path)
        finally:
            self.span = (t0, time.perf_counter())
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> str | None:
        self._done.wait()
        return self._id


def content_id_soon(path: str) -> PendingId:
    return PendingId(path)


def weights_digest(model) -> str:
    """A digest of the model's parameters: names, shapes, dtype and ~4096 evenly strided values of each (every
    fine-tune moves all of them), so KVs made by other weights or another dtype never match. Reads a few MB."""
    h = hashlib.sha256()
    samples = []
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        flat = p.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // 4096)].float())
    h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()[:32]
