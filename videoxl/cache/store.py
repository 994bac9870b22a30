"""The video KV cache: a video's prefix KVs (system prompt + video tokens), kept for later questions.

A question about a video costs decoding + vision + prefill of tens of thousands of tokens; the question itself is
a few dozen. So the prefix is kept, keyed by everything its KVs depend on (`VideoKey`): the model's weights
(a digest), the video's bytes (a content hash, or an id the caller vouches for), the frame sampling and the
chunk-prefill pattern. This is a keyed store only: it never runs a model (the pipeline, `videoxl/pipeline.py`,
builds entries and hands them in). Entries live in memory (where the model keeps its KVs: GPU, or CPU with
offload) under a byte budget (an entry counts its decoding state: bi-level's sparse level and mixed store),
least recently used first out; with a directory they are also written to disk (safetensors plus a manifest,
into a temporary folder renamed into place, so a reader never sees half an entry) and verified when read back
(key, shapes, checksums, and, through the caller's `accept`, that today's tokenizer gives the same prefix
tokens), so a restarted process answers a known video without running vision or prefill.

Writes happen after the answer (`persist_pending`, on a background thread), never in a question's first token.
The disk format is cache/disk.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from videoxl.cache.disk import KVDisk
from videoxl.cache.identity import size_of
from videoxl.decoding.state import DecodeState
from videoxl.errors import VideoXLError
from videoxl.language.kv_store import KVStore
from videoxl.language.prompt import VideoPrompt
from videoxl.prefill.plan import PrefillConfig

BUILD_TIMES = ("vision_s", "prefill_s", "peak_gpu_gb")  # stats of a build that a cache hit does not repeat
DECODE_ROOM = 512  # tokens of room after the prefix for the question and the first answer tokens


@dataclass(frozen=True)
class VideoKey:
    weights: str  # the model's `weights_digest()`
    video: str  # content id
    sampling: tuple  # (max_num_frames, sample_fps, max_sample_fps)
    chunking: tuple | None  # the PrefillConfig fields that change the KVs; None = dense
    system: str | None = None  # a custom system message (the prefix's KVs depend on it); None = the default
    kv_dtype: str | None = None  # how the KVs are stored ("fp8"); None = the model's dtype

    def as_dict(self) -> dict:
        d = {"weights": self.weights, "video": self.video, "sampling": list(self.sampling),
             "chunking": None if self.chunking is None else list(self.chunking)}
        if self.system is not None:  # absent for the default: entries written before custom systems still match
            d["system"] = self.system
        if self.kv_dtype is not None:  # likewise
            d["kv_dtype"] = self.kv_dtype
        return d

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class VideoKV:
    """One video's prefix KVs and what they are: the prefix prompt (ids, visual positions, timestamps) and
    the stats of the build that made them. `stats` is rewritten by each lookup (where the KVs came from)."""

    key: VideoKey | None
    cache: KVStore
    prompt: VideoPrompt
    stats: dict
    dirty: bool = False  # not written to disk yet
    decode: DecodeState = dataclasses.field(default_factory=DecodeState)  # captured steps, bi-level's extras

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + self.decode.nbytes  # bi-level decoding's extras grow with its questions


def chunking_key(chunking: PrefillConfig | None) -> tuple | None:
    if chunking is None:
        return None  # offload moves KVs, it does not change them
    return tuple((f.name, getattr(chunking, f.name)) for f in dataclasses.fields(chunking) if f.name != "offload")


def prompt_dict(p: VideoPrompt) -> dict:
    return {"input_ids": p.input_ids[:p.video_end], "visual_positions": p.visual_positions,
            "group_starts": p.group_starts, "video_end": p.video_end, "timestamps": p.timestamps}


# ---- the cache -------------------------------------------------------------------------------------------------
class VideoKVCache:
    """Video prefixes in memory under `max_bytes` (LRU; 0 keeps only the latest, as a single-user session
    needs), and in `directory` on disk when given. Not thread-safe by itself: the model's lock guards it."""

    def __init__(self, max_bytes: int = 0, directory: str | None = None):
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise VideoXLError(f"kv_cache_dir must be a path, got {type(directory).__name__}")
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[VideoKey, VideoKV] = OrderedDict()
        self.counts = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "vision_runs": 0, "evictions": 0}
        self.disk = None if directory is None else KVDisk(directory)

    @staticmethod
    def parse_gb(gb) -> int:
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb >= 0 or gb == float("inf"):
            raise VideoXLError(f"kv_cache_gb must be a number >= 0, got {gb!r}")
        return int(gb * 2**30)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @staticmethod
    def bytes_for(layout: dict, tokens: int) -> int:
        """What `tokens` tokens of prefix (plus the decoding room) take in a store of `layout` (layers,
        kv_heads, head_dim, itemsize), to make room before building."""
        return 2 * layout["layers"] * layout["kv_heads"] * layout["head_dim"] * (tokens + DECODE_ROOM) * \
            layout["itemsize"]

    # ---- memory ----
    def get(self, key: VideoKey, device: torch.device, offload: bool, accept) -> VideoKV | None:
        """The entry for `key`: from memory, else from disk (onto `device`, or pinned CPU memory with
        `offload`) when `accept(prompt)` finds nothing wrong with its prefix (it returns a reason to reject
        it, or None). None on a miss."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.counts["memory_hits"] += 1
            entry.stats = {k: v for k, v in entry.stats.items() if k not in BUILD_TIMES}
            entry.stats.update(kv_cache="memory", cached_tokens=entry.prompt.video_end)
            return entry
        t0 = time.perf_counter()
        entry = None if self.disk is None else self._read(key, device, offload, accept)
        if entry is None:
            self.counts["misses"] += 1
            return None
        self.counts["disk_hits"] += 1
        entry.stats["load_s"] = round(time.perf_counter() - t0, 3)
        self.put(entry)
        return entry

    def may_hold(self, size: int | None) -> bool:
        """Whether a kept entry could be of a file of `size` bytes (a cheap test before waiting for its hash)."""
        return any(size_of(k.video) in (size, None) for k in self.entries)

    def put(self, entry: VideoKV) -> None:
        self.make_room(entry.nbytes)
        self.entries[entry.key] = entry

    def built(self) -> None:
        """Count one run of vision and prefill: the work this cache is there to save."""
        self.counts["vision_runs"] += 1

    def make_room(self, incoming: int = 0) -> None:
        """Evict least recently used entries until `incoming` more bytes fit (with 0 budget: evict all)."""
        while self.entries and (self.max_bytes == 0 or self.nbytes + incoming > self.max_bytes):
            self._evict_oldest()

    def trim(self) -> None:
        """Evict least recently used entries, never the latest, until the entries fit the budget again: an
        entry grows after it was put when bi-level decoding prepares its sparse level and mixed store."""
        while len(self.entries) > 1 and self.nbytes > self.max_bytes:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, old = self.entries.popitem(last=False)
        self.counts["evictions"] += 1
        self._persist(old)  # still on disk, when there is one

    def clear(self) -> None:
        self.make_room(self.max_bytes + 1)
        self.entries.clear()

    # ---- disk ----
    def persist_pending(self) -> None:
        """Queue every entry not yet on disk for writing (a CPU snapshot now, the file on a thread)."""
        for entry in list(self.entries.values()):
            self._persist(entry)

    def _persist(self, entry: VideoKV) -> None:
        if not entry.dirty or self.disk is None:
            return
        entry.dirty = False
        s = entry.cache
        manifest = {"key": entry.key.as_dict(), "prompt": prompt_dict(entry.prompt),
                    "stats": {k: v for k, v in entry.stats.items() if k not in ("kv_cache", "cached_tokens")},
                    "layout": {"layers": s.num_layers, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                               "dtype": str(s.dtype).removeprefix("torch."), "tokens": entry.prompt.video_end,
                               "kv_dtype": s.kv_dtype}}
        self.disk.submit(entry.key.digest, manifest, s.to_tensors(entry.prompt.video_end))

    def flush(self) -> None:
        """Write what is pending and wait until it is on disk."""
        self.persist_pending()
        if self.disk is not None:
            self.disk.join()

    def _read(self, key: VideoKey, device: torch.device, offload: bool, accept) -> VideoKV | None:
        found = self.disk.read(key.digest, key.as_dict(), "cpu" if offload else str(device))
        if found is None:
            return None
        m, tensors = found
        prompt = VideoPrompt(**m["prompt"])
        why = accept(prompt)
        if why:
            self.disk.reject(key.digest, why)
            return None
        lay = m["layout"]
        store = KVStore(lay["layers"], lay["kv_heads"], lay["head_dim"], getattr(torch, lay["dtype"]), device,
                        prompt.video_end + DECODE_ROOM, offload, lay.get("kv_dtype"))
        try:
            store.load_tensors(tensors)
        except ValueError as e:
            self.disk.reject(key.digest, e)
            return None
        del tensors
        stats = {k: v for k, v in m["stats"].items() if k not in BUILD_TIMES}  # those timed the build
        return VideoKV(key, store, prompt, dict(stats, kv_cache="disk", cached_tokens=prompt.video_end))
