"""The video KV cache: a video's prefix KVs (system prompt + video tokens), kept for later questions.

A question about a video costs decoding + vision + prefill of tens of thousands of tokens; the question itself is
a few dozen. So the prefix is kept, keyed by everything its KVs depend on (`VideoKey`): the model's weights
(a digest), the video's bytes (a content hash, or an id the caller vouches for), the frame sampling and the
chunk-prefill pattern. Entries live in memory (where the model keeps its KVs: GPU, or CPU with offload) under a
byte budget (bi-level decoding's sparse level and mixed store counted with their video), least recently used
first out; with a directory they are also written to disk (safetensors plus a
manifest, into a temporary folder renamed into place, so a reader never sees half an entry) and verified when
read back (key, shapes, checksums, and that today's tokenizer gives the same prefix tokens), so a restarted
process answers a known video without running vision or prefill.

Writes happen after the answer (`persist_pending`, on a background thread), never in a question's first token.
The disk format is kv_disk.py.
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

from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.config import FRAMES_PER_GROUP
from videoxl.decoding.bilevel import held_bytes
from videoxl.errors import VideoXLError
from videoxl.cache.identity import VideoRef, content_id, weights_digest
from videoxl.cache.disk import KVDisk
from videoxl.inputs import frame_stats
from videoxl.language.kv_store import KVStore
from videoxl.memory import check_fits
from videoxl.language.prompt import VideoPrompt, build_prompt
from videoxl.video.sources import open_video

BUILD_TIMES = ("vision_s", "prefill_s", "peak_gpu_gb")  # stats of a build that a cache hit does not repeat
DEFAULT_FRAMES_PER_SLICE = 96  # vision tower batch when chunk prefill does not set one
DECODE_ROOM = 512  # tokens of room after the prefix for the question and the first answer tokens


@dataclass(frozen=True)
class VideoKey:
    weights: str  # weights_digest(model)
    video: str  # content id
    sampling: tuple  # (max_num_frames, sample_fps, max_sample_fps)
    chunking: tuple | None  # the PrefillConfig fields that change the KVs; None = dense
    system: str | None = None  # a custom system message (the prefix's KVs depend on it); None = the default

    def as_dict(self) -> dict:
        d = {"weights": self.weights, "video": self.video, "sampling": list(self.sampling),
             "chunking": None if self.chunking is None else list(self.chunking)}
        if self.system is not None:  # absent for the default: entries written before custom systems still match
            d["system"] = self.system
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

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + held_bytes(self.cache)  # bi-level decoding's extras grow with its questions


class StageTimer:
    """Wall time per stage (synchronising the GPU so each stage owns its kernels) and peak GPU memory."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device, self.times, self.t0 = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = round(now - self.t0, 3)
        self.t0 = now

    def report(self) -> dict:
        out = dict(self.times)
        if self.cuda:
            out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return out


def chunking_key(chunking: PrefillConfig | None) -> tuple | None:
    if chunking is None:
        return None  # offload moves KVs, it does not change them
    return tuple((f.name, getattr(chunking, f.name)) for f in dataclasses.fields(chunking) if f.name != "offload")


def prompt_dict(p: VideoPrompt) -> dict:
    return {"input_ids": p.input_ids[:p.video_end], "visual_positions": p.visual_positions,
            "group_starts": p.group_starts, "video_end": p.video_end, "timestamps": p.timestamps}


# ---- the prefix: from the cache, or built -------------------------------------------------------------------
def video_prefix(model, video, tokenizer, question, history, sampling: tuple,
                 chunking: PrefillConfig | None, show_progress, cancel=None, system=None) -> VideoKV:
    """The video's prefix KVs: from memory, from disk, or by running vision and prefill (and kept)."""
    cache: VideoKVCache = model.kv_cache
    cache.persist_pending()
    ident = video.id if isinstance(video, VideoRef) else (
        content_id(video) if isinstance(video, (str, os.PathLike)) else None)
    key = None
    if ident is not None:
        key = VideoKey(cache.weights_digest(model), ident, tuple(sampling), chunking_key(chunking), system)
        entry = cache.get(key, model, tokenizer, chunking)
        if entry is not None:
            return entry
    if isinstance(video, VideoRef):
        if video.path is None:
            raise VideoXLError(f"video {video.id!r} is not cached with these sampling and prefill settings; "
                               "send the video itself")
        video = video.path
    cache.counts["misses"] += 1
    entry = build_prefix(model, video, tokenizer, question, history, sampling, chunking, show_progress, key, cancel,
                         system)
    if key is not None:
        cache.put(entry)
    return entry


def build_prefix(model, video, tokenizer, question, history, sampling, chunking, show_progress,
                 key, cancel=None, system=None) -> VideoKV:
    """Vision and prefill: frames -> visual tokens -> prompt -> the KVs of everything up to the question."""
    timer = StageTimer(model.device)
    stream = open_video(video, *sampling, device=model.device)  # a CUDA model lets "auto" pick NVDEC
    groups = -(-len(stream.planned) // FRAMES_PER_GROUP)
    model.kv_cache.make_room(model.kv_cache.bytes_for(model, groups * (model.config.tokens_per_group + 16)))
    per_slice = chunking.chunk_size_for_vision_tower if chunking else DEFAULT_FRAMES_PER_SLICE
    check_fits(model, len(stream.planned), tokenizer, [question, *sum(history, ())], chunking, per_slice,
               len(stream.planned) if stream.source == "images" else 0)  # images are decoded all at once
    visual = model.encode_stream(stream, per_slice, show_progress, cancel)
    timer.lap("vision_s")  # video decoding included: it runs alongside
    frames = len(stream.kept)
    timestamps = stream.timestamps + [stream.timestamps[-1]] * (-frames % FRAMES_PER_GROUP)
    prompt = build_prompt(tokenizer, question, timestamps, model.config.tokens_per_group,
                          model._placeholder_id(tokenizer), history, system)
    embeds = model.embed_prompt(prompt, visual, prompt.video_end)
    del visual
    store = model.decoder.new_cache(capacity=len(prompt) + DECODE_ROOM, offload=bool(chunking and chunking.offload))
    stats = {"frames": frames, **frame_stats(stream), "groups": len(prompt.group_starts),
             "video_tokens": prompt.video_end, **stream.stats}
    stats.update(model.prefill(embeds, store, prompt, chunking, show_progress, cancel))
    timer.lap("prefill_s")
    stats.update(timer.report())
    prefix = VideoPrompt(**prompt_dict(prompt))
    model.kv_cache.counts["vision_runs"] += 1
    return VideoKV(key, store, prefix, dict(stats, kv_cache="miss", cached_tokens=0), dirty=key is not None)


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
        self._digest: tuple[int, str] | None = None
        self.disk = None if directory is None else KVDisk(directory)

    @staticmethod
    def parse_gb(gb) -> int:
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb >= 0 or gb == float("inf"):
            raise VideoXLError(f"kv_cache_gb must be a number >= 0, got {gb!r}")
        return int(gb * 2**30)

    def weights_digest(self, model) -> str:
        if self._digest is None or self._digest[0] != id(model):
            self._digest = (id(model), weights_digest(model))
        return self._digest[1]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @staticmethod
    def bytes_for(model, tokens: int) -> int:
        """What `tokens` tokens of prefix (plus the decoding room) take, to make room before building."""
        t = model.config.text
        return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * (tokens + DECODE_ROOM) * \
            model.dtype.itemsize

    # ---- memory ----
    def get(self, key: VideoKey, model, tokenizer, chunking) -> VideoKV | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.counts["memory_hits"] += 1
            entry.stats = {k: v for k, v in entry.stats.items() if k not in BUILD_TIMES}
            entry.stats.update(kv_cache="memory", cached_tokens=entry.prompt.video_end)
            return entry
        if self.disk is None:
            return None
        t0 = time.perf_counter()
        entry = self._read(key, model, tokenizer, chunking)
        if entry is None:
            return None
        self.counts["disk_hits"] += 1
        entry.stats["load_s"] = round(time.perf_counter() - t0, 3)
        self.put(entry)
        return entry

    def put(self, entry: VideoKV) -> None:
        self.make_room(entry.nbytes)
        self.entries[entry.key] = entry

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
                               "dtype": str(s.dtype).removeprefix("torch."), "tokens": entry.prompt.video_end}}
        self.disk.submit(entry.key.digest, manifest, s.to_tensors(entry.prompt.video_end))

    def flush(self) -> None:
        """Write what is pending and wait until it is on disk."""
        self.persist_pending()
        if self.disk is not None:
            self.disk.join()

    def _read(self, key: VideoKey, model, tokenizer, chunking) -> VideoKV | None:
        offload = bool(chunking and chunking.offload)
        found = self.disk.read(key.digest, key.as_dict(), "cpu" if offload else str(model.device))
        if found is None:
            return None
        m, tensors = found
        prompt = VideoPrompt(**m["prompt"])
        rebuilt = build_prompt(tokenizer, "?", prompt.timestamps, model.config.tokens_per_group,
                               model._placeholder_id(tokenizer), system=key.system)
        if rebuilt.input_ids[:rebuilt.video_end] != prompt.input_ids:
            self.disk.reject(key.digest, "this tokenizer gives other prefix tokens")
            return None
        store = model.decoder.new_cache(capacity=prompt.video_end + DECODE_ROOM, offload=offload)
        try:
            store.load_tensors(tensors)
        except ValueError as e:
            self.disk.reject(key.digest, e)
            return None
        del tensors
        if chunking is not None:
            store.plan = BlockPlan.from_prompt(prompt, chunking)
        stats = {k: v for k, v in m["stats"].items() if k not in BUILD_TIMES}  # those timed the build
        return VideoKV(key, store, prompt, dict(stats, kv_cache="disk", cached_tokens=prompt.video_end))
