"""Decoding: from the logits after the prompt to the answer's tokens, one step per token.

    step = decode_step(decoder, cache, ...)   # captured (CUDA, resident KVs) or eager (CPU, offloaded KVs)
    for token in generate_tokens(...):        # sampling on the device, one host sync per token

The captured step (`captured.py`) is a CUDA graph over Triton kernels (`kernels.py`); the eager step
(`eager.py`) is the decoder's plain forward and the reference in tests. Both feed the same `Sampler`.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from videoxl.cancel import Cancel, check
from videoxl.language.decoder import Qwen2Decoder
from videoxl.decoding.generation import GenerationConfig
from videoxl.language.kv_store import KVStore
from videoxl.decoding.eager import EagerStep
from videoxl.decoding.sampling import Sampler
from videoxl.decoding.state import DecodeState

CAPACITY_BUCKET = 8192  # KV capacity grows in these steps, so a follow-up question rarely reallocates


def bucketed(tokens: int) -> int:
    """`tokens` rounded up to whole buckets: stores of similar size share a capacity (and a captured graph)."""
    return -(-tokens // CAPACITY_BUCKET) * CAPACITY_BUCKET


def fast_path_available(cache: KVStore) -> bool:
    if cache.device.type != "cuda" or cache.offload:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def decode_step(decoder: Qwen2Decoder, cache: KVStore, max_new_tokens: int, mode: str = "auto",
                state: DecodeState | None = None):
    """The step object for `cache`: 'captured' (a CUDA graph, kept in `state` for the video's follow-up
    questions; without a state, captured afresh), 'eager', or 'auto' (captured where it can run)."""
    if mode == "auto":
        mode = "captured" if fast_path_available(cache) else "eager"
    if mode == "eager":
        return EagerStep(decoder, cache)
    from videoxl.decoding.captured import CapturedStep

    need = cache.length + max_new_tokens + 1
    if need > cache.capacity:
        cache.reserve(bucketed(need))
    step = None if state is None else state.captured_step(cache)
    if step is None or not step.valid_for(cache):
        step = CapturedStep(decoder, cache)
        step.capture()
        if state is not None:
            state.keep_step(cache, step)
    else:
        step.capture_s = 0.0
    step.start()
    return step


def generate_tokens(step, logits: torch.Tensor, gen: GenerationConfig, prompt_ids: list[int], stop_ids: set[int],
                    vocab_size: int, stats: dict | None = None, cancel: Cancel | None = None) -> Iterator[int]:
    """Token ids of the answer, the first sampled from `logits` (the prompt's last position). The next step is
    queued before the host reads the current token, so the GPU never waits for Python.

    `step`: a decode step, or a function that makes one (`decode_step`), called only once the first token is
    out: capturing a CUDA graph for a store that grew (a live session, a longer video) then costs the second
    token, not the first."""
    device = logits.device
    make = (lambda: step) if hasattr(step, "step") else step
    sampler = Sampler(gen, vocab_size, device, prompt_ids)
    cuda = device.type == "cuda"
    host = torch.empty(1, dtype=torch.long, pin_memory=cuda)
    ready = torch.cuda.Event() if cuda else None
    fed = produced = 0
    t0 = time.perf_counter()
    token = sampler(logits.reshape(-1, logits.shape[-1])[-1])
    current = None
    try:
        for i in range(gen.max_new_tokens):
            check(cancel)
            more = i + 1 < gen.max_new_tokens
            host.copy_(token, non_blocking=cuda)
            if cuda:
                ready.record()
            if more and current is not None:
                next_logits = current.step(token)
                fed += 1
            if cuda:
                ready.synchronize()
            value = int(host[0])
            if value in stop_ids:
                fed = min(fed, produced)  # the stop token's K/V is not part of the answer
                break
            produced += 1
            yield value
            if more:
                if current is None:  # after the first token
                    current = make()
                    next_logits = current.step(token)
                    fed += 1
                token = sampler(next_logits)
    finally:
        if current is None and hasattr(step, "step"):  # given, never stepped
            current = step
        if current is not None:
            current.finish(fed)
        if stats is not None:
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            stats.update(generated_tokens=produced, decode_s=round(seconds, 3),
                         decode_tokens_per_s=round(produced / seconds, 1) if seconds > 0 and produced else None)
