"""One question, top to bottom. Every stage has its folder; this is the one place that runs them in order:

    key -> the video cache's entry (memory or disk), or:
        open (video/) -> memory check (memory.py) -> encode (vision/) -> prompt (language/) -> embed
        -> prefill (prefill/) -> put in the cache (cache/)
    then the question's tokens over the video's KVs, dense or bi-level (decoding/bilevel.py)
    -> generate (decoding/) -> text

The model (model.py) is the weights and the card's API; it takes the lock, checks the arguments and the
settings, and calls `answer`. The video cache (cache/store.py) only stores: entries are built here.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Iterator

import torch

from videoxl.cancel import Cancel
from videoxl.cache.identity import VideoRef, content_id_soon
from videoxl.cache.store import DECODE_ROOM, VideoKey, VideoKV, VideoKVCache, chunking_key, prompt_dict
from videoxl.config import FRAMES_PER_GROUP
from videoxl.decoding import decode_step, generate_tokens
from videoxl.decoding.bilevel import bilevel_question
from videoxl.decoding.detokenize import Detokenizer
from videoxl.errors import VideoXLError, VideoXLWarning
from videoxl.inputs import Request
from videoxl.language.prompt import VideoPrompt, build_prompt, prompt_tokens
from videoxl.memory import check_fits
from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.prefill.growing import GrowingPrefix, extend_now, prefill_as_encoded
from videoxl.progress import close, progress
from videoxl.settings import Settings
from videoxl.timeline import Timeline
from videoxl.video.gpu import SideStream
from videoxl.video.prefetch import take
from videoxl.video.sources import open_video
from videoxl.vision.stream import encode_slices

DEFAULT_FRAMES_PER_SLICE = 96  # vision tower batch when chunk prefill does not set one
VISION_PAD = "<|vision_pad|>"


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


def frames_per_slice(chunking: PrefillConfig | None) -> int:
    """Frames the vision tower takes at once: the chunk prefill's setting, else the default."""
    return chunking.chunk_size_for_vision_tower if chunking else DEFAULT_FRAMES_PER_SLICE


def placeholder_id(config, tokenizer) -> int:
    """The token that stands for a visual token in the prompt's ids (replaced by its embedding)."""
    pad = tokenizer.convert_tokens_to_ids(VISION_PAD)
    return pad if isinstance(pad, int) and 0 <= pad < config.text.vocab_size else 0


def kv_layout(model) -> dict:
    t = model.config.text
    return {"layers": t.num_hidden_layers, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
            "itemsize": model.dtype.itemsize}


# ---- the video's prefix KVs: from the cache, or built ---------------------------------------------------------
def video_prefix(model, video, tokenizer, question, history, sampling: tuple, chunking: PrefillConfig | None,
                 show_progress, timeline: Timeline | None = None, cancel: Cancel | None = None,
                 system: str | None = None) -> VideoKV:
    """The video's prefix KVs: from memory, from disk, or by running vision and prefill (and kept). A file's
    content hash runs on a thread beside decoding unless an entry could match (the lookup then waits for it)."""
    cache: VideoKVCache = model.kv_cache
    timeline = timeline or Timeline()
    cache.persist_pending()
    pending = content_id_soon(video) if isinstance(video, (str, os.PathLike)) else None
    ident = video.id if isinstance(video, VideoRef) else None
    if pending is not None and (pending.done() or cache.disk is not None or cache.may_hold(pending.size)):
        ident = pending.result()  # an entry could match: the lookup needs the hash now

    def key_of(ident):
        return VideoKey(model.weights_digest(), ident, tuple(sampling), chunking_key(chunking), system,
                        model.decoder.kv_dtype)

    key = None
    if ident is not None:
        key = key_of(ident)
        entry = cache.get(key, model.device, bool(chunking and chunking.offload),
                          accept=lambda p: same_prefix_tokens(model.config, tokenizer, p, system))
        if entry is not None:
            if chunking is not None and entry.cache.plan is None:  # read from disk: the pattern is not stored
                entry.cache.plan = BlockPlan.from_prompt(entry.prompt, chunking)
            return entry
    if isinstance(video, VideoRef):
        if video.path is None:
            raise VideoXLError(f"video {video.id!r} is not cached with these sampling and prefill settings; "
                               "send the video itself")
        video = video.path
    entry = build_prefix(model, video, tokenizer, question, history, sampling, chunking, show_progress, key,
                         timeline, cancel, system)
    if key is None and pending is not None and (ident := pending.result()) is not None:  # hashed beside decoding
        entry.key, entry.dirty = key_of(ident), True
    if pending is not None and pending.span is not None:
        timeline.add("hash", *pending.span)
    if entry.key is not None:
        cache.put(entry)
    return entry


def same_prefix_tokens(config, tokenizer, prompt: VideoPrompt, system: str | None = None) -> str | None:
    """None when today's tokenizer gives the stored prefix's tokens (the KVs belong to those), else why not."""
    rebuilt = build_prompt(tokenizer, "?", prompt.timestamps, config.tokens_per_group,
                           placeholder_id(config, tokenizer), system=system)
    return None if rebuilt.input_ids[:rebuilt.video_end] == prompt.input_ids else \
        "this tokenizer gives other prefix tokens"


def build_prefix(model, video, tokenizer, question, history, sampling, chunking, show_progress, key,
                 timeline: Timeline | None = None, cancel: Cancel | None = None,
                 system: str | None = None) -> VideoKV:
    """Vision and prefill: frames -> visual tokens -> the KVs of everything up to the question. Where it is the
    faster way (`prefill_as_encoded`: dense, or on the CPU), each slice of frames is prefilled as soon as it is
    encoded while later frames are still being decoded (prefill/growing.py; the KVs equal a one-shot prefill's);
    slices that are encoded while the GPU is busy go through the decoder together. Chunked modes on CUDA
    prefill in one FlexAttention pass after the last slice."""
    timer, timeline = StageTimer(model.device), timeline or Timeline()
    stream = take(model, video, sampling) or open_video(video, *sampling, device=model.device)  # CUDA: NVDEC
    capacity = prompt_tokens(model.config, len(stream.planned))
    model.kv_cache.make_room(VideoKVCache.bytes_for(kv_layout(model), capacity))
    per_slice = frames_per_slice(chunking)
    check_fits(model, len(stream.planned), tokenizer, [question, *sum(history, ())], chunking, per_slice,
               len(stream.planned) if stream.source == "images" else 0)  # images are decoded all at once
    prefix = GrowingPrefix(model.decoder, tokenizer, model.config.tokens_per_group,
                           placeholder_id(model.config, tokenizer), chunking, capacity + DECODE_ROOM, system=system)
    overlap = prefill_as_encoded(model.device, chunking)
    waiting, times, t_prefill = [], [], 0.0

    def add_waiting():  # the encoded slices not prefilled yet: their groups, each group's first frame's time
        with timeline.gpu_span("prefill"):
            prefix.add(torch.cat(waiting), times[prefix.groups * FRAMES_PER_GROUP::FRAMES_PER_GROUP])
        waiting.clear()

    work = SideStream(model.device)  # vision and prefill off the default stream, where NVDEC's frames are waited for
    with work.work():
        for piece in encode_slices(model.vision, stream, per_slice, model.device, show_progress, timeline, cancel):
            waiting.append(piece.visual)
            times += piece.timestamps
            if overlap and extend_now(len(times), len(stream.planned), prefix.groups, piece.more_waiting):
                t0 = time.perf_counter()
                add_waiting()
                t_prefill += time.perf_counter() - t0
        timer.lap("vision_s")  # frame decoding, vision and (overlap) the prefill of all but the last slice
        stats = {"prefill_overlapped": overlap, "prefill_launch_s": round(t_prefill, 3)}
        if not overlap:
            with timeline.gpu_span("prefill"):
                stats.update(prefix.add_all(torch.cat(waiting), times[::FRAMES_PER_GROUP], show_progress, cancel))
        elif waiting:
            add_waiting()
    timer.lap("prefill_s")  # after the last slice
    frames = len(stream.kept)
    prompt, store = prefix.prompt, prefix.store
    prompt.timestamps = list(stream.timestamps) + [stream.timestamps[-1]] * (-frames % FRAMES_PER_GROUP)
    stats = {"frames": frames, **frame_stats(stream), "groups": len(prompt.group_starts),
             "video_tokens": prompt.video_end, **stream.stats, **prefill_stats(store, chunking), **stats}
    stats.update(timer.report())
    model.kv_cache.built()
    return VideoKV(key, store, VideoPrompt(**prompt_dict(prompt)), dict(stats, kv_cache="miss", cached_tokens=0),
                   dirty=key is not None)


def prefill_stats(store, chunking: PrefillConfig | None) -> dict:
    if chunking is None:
        return {"prefill": "dense", "attended_share": 1.0}
    plan = store.plan  # None while no group is in
    return {"prefill": chunking.chunk_prefill_mode, "blocks": len(plan.blocks) if plan else 0,
            "attended_share": round(plan.attended_share(), 4) if plan else 1.0, "offload": chunking.offload}


# ---- what the video gave -----------------------------------------------------------------------------------------
def frame_stats(stream) -> dict:
    """Frames read against frames planned, and their timestamps. A file cut off mid-way decodes fewer frames
    than its header promised: the answer then rests on fewer frames, which the caller should hear about."""
    read, expected = len(stream.kept), len(stream.planned)
    if read < expected:
        warnings.warn(f"video ended early: {read} of {expected} expected frames read from {stream.source} "
                      f"(file cut off or damaged?); answering from those", VideoXLWarning, stacklevel=4)
    return {"frames_expected": expected, "timestamps": list(stream.timestamps)}


def answer_stats(prefix_stats: dict, cache_hit: bool, prompt_tokens: int) -> dict:
    """`last_stats` of one question. A follow-up that reused the video's KVs reports that, not the times and
    memory of the question that built them."""
    stats = dict(prefix_stats, prompt_tokens=prompt_tokens, cache_hit=cache_hit)
    if cache_hit:
        for key in ("vision_s", "prefill_s", "peak_gpu_gb", "video_decode_s", "video_frames_read"):
            stats.pop(key, None)
    return stats


# ---- the question ----------------------------------------------------------------------------------------------
def answer(model, tokenizer, r: Request, settings: Settings, show_progress=False,
           cancel: Cancel | None = None) -> Iterator[str]:
    """The answer's text, piece by piece; a new `model.last_stats` is filled as it goes (one dict per question:
    a caller may keep the last one). The caller holds the model's lock, the model's GPU as the current device
    and inference mode."""
    timeline = Timeline(model.device)
    t_question = time.perf_counter()
    entry = video_prefix(model, r.video, tokenizer, r.question, r.history,
                         (r.max_num_frames, r.sample_fps, r.max_sample_fps), settings.prefill, show_progress,
                         timeline, cancel, r.system)
    prompt = build_prompt(tokenizer, r.question, entry.prompt.timestamps, model.config.tokens_per_group,
                          placeholder_id(model.config, tokenizer), r.history, r.system)
    stats = model.last_stats = answer_stats(entry.stats, entry.stats["kv_cache"] != "miss", len(prompt))
    timeline.resolve()  # vision and prefill, timed on the GPU
    stats["timeline"] = timeline.events  # filled on until the last token
    yield from answer_over(model, tokenizer, entry.cache, prompt, settings, stats, t_question, entry.decode,
                           show_progress, timeline, cancel)
    model.kv_cache.persist_pending()  # to disk, after the answer


def answer_over(model, tokenizer, store, prompt: VideoPrompt, settings: Settings, stats: dict, t_question: float,
                state, show_progress=False, timeline: Timeline | None = None,
                cancel: Cancel | None = None) -> Iterator[str]:
    """The question (`prompt`'s tokens after `video_end`) over `store`, the KVs of the prompt up to `video_end`
    (a previous question's tokens after it are dropped), dense or bi-level, then the answer's text into `stats`.
    `state`: the video's DecodeState. A live session (live/session.py) calls this over its growing store."""
    timeline = timeline or Timeline(model.device)
    store.truncate(prompt.video_end)
    tail = torch.tensor(prompt.input_ids[prompt.video_end:], device=model.device)
    if settings.sparse is None:
        logits = model.decoder(model.decoder.embed_tokens(tail)[None], store)
    else:  # the question and answer run over a mixed dense/pooled copy; the video's store stays whole
        store, logits, info = bilevel_question(model.decoder, store, tail, settings.sparse, prompt.timestamps,
                                               settings.prefill.groups_per_block,
                                               settings.generation.max_new_tokens, state, cancel)
        stats.update(info)
        model.kv_cache.trim()
    yield from generate(model, store, logits, tokenizer, settings.generation, prompt.input_ids, stats, t_question,
                        state, show_progress, timeline, cancel)


def generate(model, store, logits, tokenizer, gen, prompt_ids: list[int], stats: dict, t_question: float,
             state, show_progress, timeline: Timeline, cancel: Cancel | None = None) -> Iterator[str]:
    stop = {i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
            if isinstance(i, int)}

    stats.update(decode_path=None, capture_s=None)  # no step is made for an answer of one token
    if store.kv_dtype:  # how the KVs this answer read were stored (absent: the model's dtype)
        stats["kv_dtype"] = store.kv_dtype

    def make_step():  # after the first token: a graph capture then never delays it
        step = decode_step(model.decoder, store, gen.max_new_tokens, model.decode_mode, state)
        stats.update(decode_path=type(step).__name__.replace("Step", "").lower(),
                     capture_s=None if step.capture_s is None else round(step.capture_s, 3))
        return step

    detok = Detokenizer(tokenizer)
    bar = progress(None, gen.max_new_tokens, "decode", show_progress)
    first, t_start = True, time.perf_counter()
    try:
        for token in generate_tokens(make_step, logits, gen, prompt_ids, stop, model.config.text.vocab_size, stats,
                                     cancel):
            if first:
                now = time.perf_counter()
                stats["ttft_s"] = round(now - t_question, 3)
                timeline.add("first_token", t_start, now)
                first, t_start = False, now
            if bar is not None:
                bar.update(1)
            piece = detok.add(token)
            if piece:
                yield piece
    finally:
        close(bar)
        if not first:
            timeline.add("answer", t_start, time.perf_counter())
    rest = detok.flush()
    if rest:
        yield rest
