"""Identities the video KV cache is keyed by: a video file's content hash and the model's weights digest."""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass

import torch

from videoxl.video.sources import regular_files

@dataclass(frozen=True)
class VideoRef:
    """A video named by a content id (`content_id(path)`, or a name its caller vouches for), with the file to
    read if its KVs are not cached. `path=None`: answer only from the cache."""

    id: str
    path: str | tuple | None = None  # a tuple: still images, as frames


_content_ids: dict[tuple, str] = {}
_content_lock = threading.Lock()


def content_id(path: str) -> str | None:
    """sha256 of a file's bytes (a folder of images: of their names and bytes), remembered per (path, inode,
    size, mtime) so a known file is hashed once per process. None for what is not a file or folder."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError:
        return None
    memo = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    with _content_lock:
        if memo in _content_ids:
            return _content_ids[memo]
    h = hashlib.sha256()
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return None  # a FIFO or device: reading it might never end (open_video refuses it)
    if os.path.isdir(path):
        files = [os.path.basename(f) for f in regular_files(path)]
        for name in files:
            h.update(name.encode() + b"\0")
            _hash_file(h, os.path.join(path, name))
    else:
        _hash_file(h, path)
    digest = "sha256:" + h.hexdigest()
    with _content_lock:
        _content_ids[memo] = digest
    return digest


def remember_content_id(path: str, digest: str) -> None:
    """Record a hash computed while the file was written (the server hashes uploads as it receives them)."""
    st = os.stat(path)
    with _content_lock:
        _content_ids[(os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)] = digest


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


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
