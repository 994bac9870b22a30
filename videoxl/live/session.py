"""A live session: ask about a video while it is still being recorded.

    session = model.open_live(tokenizer, sample_fps=1.0)
    session.append(frames)                  # PIL images, HxWx3 arrays or [T,H,W,3]; timestamps optional
    session.append_source("cam.ts")         # or follow a growing file / a stream in the background
    print(session.ask("What just happened?"), session.last_stats["covers_s"])
    session.close()

Frames are sampled at `sample_fps` from their real times and go to the model in groups of 4, each group's
visual tokens prefilled into the session's KV store as soon as it is complete (prefill/incremental.py: the KVs
equal a one-shot prefill of the same frames). A question is answered over every complete group; frames of an
incomplete group are not covered yet, and the answer's stats say so.

Threads: appends run one after another in arrival order (`_ingest`); the store is extended or read by one of
them at a time (`_store`), so a question sees the groups complete when it starts and nothing else, and an
append that arrives during an answer runs its vision meanwhile and waits only to prefill.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from videoxl import pipeline
from videoxl.config import FRAMES_PER_GROUP
from videoxl.decoding.state import DecodeState
from videoxl.errors import VideoXLError
from videoxl.cancel import Cancel
from videoxl.devices import on_device
from videoxl.inputs import check_question
from videoxl.language.prompt import VideoPrompt, question_ids
from videoxl.live.frames import Sampler, as_frames, check_timestamps, frame_time, prepare, whole_groups
from videoxl.memory import kv_bytes_per_token, memory_errors
from videoxl.prefill.growing import GrowingPrefix
from videoxl.settings import Settings
from videoxl.video.read import usable_cores


def session_settings(model, settings, enable_chunk_prefill, prefill_config, enable_sparse, sparse_config):
    """`settings` (default: the model card's switches on model.config), with the session's own: a dict given
    turns its switch on, `enable_*=False` turns it off, `enable_*=True` alone keeps or defaults the dict."""
    base = settings if settings is not None else Settings.from_card(model.config)
    if not isinstance(base, Settings):
        raise VideoXLError(f"settings must be a videoxl.settings.Settings, got {type(base).__name__}")

    def pick(enable, given, current):
        if enable is False:
            return None
        if given is not None:
            return given
        if current is not None:
            return dataclasses.asdict(current)
        return {} if enable else None

    built = Settings.build(pick(enable_chunk_prefill, prefill_config, base.prefill),
                           pick(enable_sparse, sparse_config, base.sparse))
    return Settings(built.prefill, built.sparse, base.generation)


class LiveLimitError(VideoXLError):
    """A session's frame or byte limit would be passed (the server answers 413)."""


def check_limit(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise VideoXLError(f"{name} must be a positive integer or None, got {value!r}")
    return value


class LiveSession:
    """See the module's docstring. `settings` (videoxl.settings.Settings; default: the model card's switches)
    with the session's own `enable_chunk_prefill`, `prefill_config`, `enable_sparse`, `sparse_config` (a dict
    given turns its switch on) say how to prefill and decode, and the generation defaults. `max_frames` (sampled
    frames) and `max_bytes` (KV bytes) bound the session: an append that would pass one is refused whole."""

    def __init__(self, model, tokenizer, sample_fps: float = 1.0, max_frames: int | None = None,
                 max_bytes: int | None = None, settings: Settings | None = None,
                 enable_chunk_prefill: bool | None = None, prefill_config: dict | None = None,
                 enable_sparse: bool | None = None, sparse_config: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.sampler = Sampler(sample_fps)
        self.max_frames, self.max_bytes = check_limit(max_frames, "max_frames"), check_limit(max_bytes, "max_bytes")
        self.settings = session_settings(model, settings, enable_chunk_prefill, prefill_config, enable_sparse,
                                         sparse_config)
        self.chunking, self.sparse = self.settings.prefill, self.settings.sparse
        self.per_slice = pipeline.frames_per_slice(self.chunking)
        self._ingest, self._store, self._state = threading.Lock(), threading.RLock(), threading.Lock()
        self._pending: list[np.ndarray] = []  # sampled frames not yet in a whole group
        self._pending_times: list[float] = []
        self.timestamps: list[float] = []  # per frame in whole groups
        self.frames_received = 0
        self.ingest = {"vision_s": 0.0, "prefill_s": 0.0}  # time spent on the appended frames, per stage
        self.history: list[tuple[str, str]] = []
        self.last_stats: dict = {}
        self.sources: list = []
        self.closed = False
        self._token_bytes = kv_bytes_per_token(model.config, model.dtype.itemsize, kv_dtype=model.decoder.kv_dtype)
        self.decode = DecodeState()  # the captured decode step and bi-level's level, kept between questions
        self._resize = ThreadPoolExecutor(min(8, usable_cores()), thread_name_prefix="videoxl-live-resize")
        with on_device(model.device), torch.inference_mode():
            self.prefix = GrowingPrefix(model.decoder, tokenizer, model.config.tokens_per_group,
                                        pipeline.placeholder_id(model.config, tokenizer), self.chunking)
        self.prompt = self.prefix.prompt

    # ---- frames in ----------------------------------------------------------------------------------------
    def append(self, frames, timestamps=None) -> dict:
        """Add frames (their times in seconds; None: one `1/sample_fps` after another). Returns what was taken:
        frames received and sampled, groups completed by this call, frames waiting for their group."""
        self._check_open()
        items = as_frames(frames)
        with self._ingest:
            self._check_open()
            sampler = copy.copy(self.sampler)  # moved on only if the frames are accepted
            times = sampler.default_times(len(items)) if timestamps is None else \
                check_timestamps(timestamps, len(items), sampler.last)
            kept = sampler.keep(times)
            self._check_limits(len(kept))
            self.sampler = sampler
            with self._state:
                self.frames_received += len(items)
                self._pending.extend(prepare([items[i] for i in kept], self._resize))
                self._pending_times.extend(frame_time(times[i]) for i in kept)
            groups = self._ingest_groups()
        return {"frames_received": len(items), "frames_sampled": len(kept), "groups_added": groups,
                "frames_pending": len(self._pending)}

    def append_source(self, source, **options):
        """Follow a growing file or a stream (a path, or a URL PyAV can open) on a background thread until
        `close`; returns the reader (its `error`, `frames_read`; also in `stats['sources']`)."""
        from videoxl.live.source import SourceReader

        self._check_open()
        reader = SourceReader(self, source, **options)
        self.sources.append(reader)
        reader.start()
        return reader

    def _check_limits(self, new_frames: int) -> None:
        frames = len(self.timestamps) + len(self._pending) + new_frames
        if self.max_frames is not None and frames > self.max_frames:
            raise LiveLimitError(f"live session full: {frames} frames would pass its limit of {self.max_frames} "
                                 f"(max_frames); open a new session or raise the limit")
        if self.max_bytes is not None:
            groups = -(-frames // FRAMES_PER_GROUP) - len(self.prompt.group_starts)
            per_group = self.model.config.tokens_per_group + 16  # + the `Time ...s:` tokens, generously
            need = (self.prompt.video_end + groups * per_group) * self._token_bytes
            if need > self.max_bytes:
                raise LiveLimitError(f"live session full: its KVs would take {need / 2**20:.1f} MiB, over its "
                                     f"limit of {self.max_bytes / 2**20:.1f} MiB (max_bytes); open a new session "
                                     "or raise the limit")

    def _ingest_groups(self) -> int:
        """Encode and prefill the pending frames that fill whole groups, a vision slice at a time."""
        added = 0
        model = self.model
        while len(self._pending) >= FRAMES_PER_GROUP:
            n = min(whole_groups(len(self._pending)), self.per_slice)
            frames, times = np.stack(self._pending[:n]), self._pending_times[:n]
            with on_device(model.device), torch.inference_mode(), memory_errors(model.device, n, bool(self.chunking)):
                t0 = time.perf_counter()
                visual = torch.cat(list(model.vision.encode(frames, self.per_slice)), dim=0)
                self._time("vision_s", t0)
                with self._store:  # waits for a question being answered; vision above did not
                    t0 = time.perf_counter()
                    # (out of memory, say) the session stays as it was before these groups
                    self.prefix.add(visual, times[::FRAMES_PER_GROUP])
                    self.decode.video_grew()
                    self._time("prefill_s", t0)
                    with self._state:
                        self.timestamps.extend(times)
                        del self._pending[:n], self._pending_times[:n]
            added += n // FRAMES_PER_GROUP
        return added

    def _time(self, stage: str, t0: float) -> None:
        """Add a stage's time to `ingest` (waiting for the GPU: a stage owns its kernels, as StageTimer does)."""
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.ingest[stage] = round(self.ingest[stage] + time.perf_counter() - t0, 4)

    # ---- questions --------------------------------------------------------------------------------------------
    def ask(self, question: str, generation_config: dict | None = None, chat_history=None,
            follow_up: bool = False) -> str:
        """The answer over every complete group so far. `follow_up=True` continues this session's
        conversation (its earlier questions and answers); `chat_history` gives one explicitly."""
        return "".join(self.stream_ask(question, generation_config, chat_history, follow_up))

    def stream_ask(self, question: str, generation_config: dict | None = None, chat_history=None,
                   follow_up: bool = False, show_progress=False, system: str | None = None,
                   cancel: Cancel | None = None):
        """`ask`, yielding the answer's text as it is generated. `cancel` stops it at the next token; a live
        session's prefix was prefilled with the default system text, so another one is refused."""
        self._check_open()
        model, tok = self.model, self.tokenizer
        history, system = check_question(model.config, tok, question, chat_history, system)
        if system is not None:
            raise VideoXLError("a live session answers with the model's default system message; send none")
        settings = self.settings.with_generation(generation_config)
        if follow_up and not history:
            history = list(self.history)
        with model._exclusive(), on_device(model.device), torch.inference_mode(), self._store, \
                memory_errors(model.device, len(self.timestamps), bool(self.chunking)):
            self._check_open()
            if not self.timestamps:
                raise VideoXLError(f"nothing to ask about yet: the model reads frames in groups of 4 and "
                                   f"{len(self._pending)} sampled frame(s) have arrived")
            t_question = time.perf_counter()
            video = self.prompt
            prompt = VideoPrompt(video.input_ids + question_ids(tok, question, history), video.visual_positions,
                                 video.group_starts, video.video_end, list(self.timestamps))
            stats = model.last_stats = self._question_stats(len(prompt))  # one dict per question, as `chat`
            pieces = []
            for piece in pipeline.answer_over(model, tok, self.prefix.store, prompt, settings, stats, t_question,
                                              self.decode, show_progress, cancel=cancel):
                pieces.append(piece)
                yield piece
            self.history.append((question, "".join(pieces)))
            self.last_stats = dict(stats)

    def _question_stats(self, prompt_tokens: int) -> dict:
        stats = dict(self.stats, prompt_tokens=prompt_tokens, covers_s=[self.timestamps[0], self.timestamps[-1]],
                     live=True, cache_hit=True)
        if self._pending:
            stats["not_covered"] = (f"{len(self._pending)} frame(s) from {self._pending_times[0]:g} s on wait for "
                                    "a whole group of 4; this answer covers the video up to "
                                    f"{self.timestamps[-1]:g} s")
        return stats

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        with self._state:
            store = self.prefix.store if self.prefix is not None else None
            tokens = self.prefix.prefill.length if self.prefix is not None else 0
            out = {"frames": len(self.timestamps), "frames_pending": len(self._pending),
                   "frames_received": self.frames_received, "groups": len(self.timestamps) // FRAMES_PER_GROUP,
                   "covered_s": [self.timestamps[0], self.timestamps[-1]] if self.timestamps else None,
                   "kv_tokens": tokens, "kv_bytes": tokens * self._token_bytes,
                   "kv_reserved_bytes": store.nbytes if store is not None else 0,
                   "kv_offload": bool(store is not None and store.offload),
                   "prefill": self.chunking.chunk_prefill_mode if self.chunking else "dense",
                   "bilevel": self.sparse is not None, "closed": self.closed, "ingest": dict(self.ingest),
                   "sources": [r.status() for r in self.sources]}
        if self.model.device.type == "cuda":
            out["gpu_allocated_gb"] = round(torch.cuda.memory_allocated(self.model.device) / 2**30, 3)
        return out

    def close(self) -> None:
        """Stop the background readers and free the KVs. Later calls are refused."""
        self.closed = True
        for reader in self.sources:
            reader.stop()
        with self._ingest, self._store:
            self.prefix, self.decode = None, None
            self._resize.shutdown(wait=False)
        self._pending, self._pending_times = [], []

    def _check_open(self) -> None:
        if self.closed:
            raise VideoXLError("this live session is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
