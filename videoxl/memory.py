"""Peak GPU memory of a question (on a CPU: host RAM, against MemAvailable), estimated before any frame is
decoded, and the check that stops a run that would not fit (with a setting that would).

The estimate adds up the tensors the code holds at its two peaks, per token or per frame, from the config:

* vision: frames are encoded `frames_per_slice` at a time; a slice holds, per SigLIP patch token, the residual
  stream, the layernorm output, q, k, v and the attention output (6 x vision width) and the MLP's fc1 output and
  GELU (2 x vision MLP width); the visual tokens made so far are held twice while they are concatenated.
* prefill, per token of the prompt up to the end of the video (the input embeddings are held throughout):
  - dense (layer at a time): the KVs of all layers + embeddings, hidden states and one layer's queries twice
    while they are concatenated (4 x hidden); then the MLP of one 16,384-token slice (3 x MLP width);
  - 'streaming' (layer at a time, block-sparse): embeddings, hidden states, queries, queries gathered into the
    attention order and the attention output (5 x hidden) + the gathered K/V; the KVs of all layers, or with
    offload only two staging slots of one layer's K/V;
  - 'mask' (one forward pass over the whole sequence): embeddings, the residual stream and its layernorm output
    (3 x hidden) + the MLP's SiLU output, up projection and their product for every token (3 x MLP width) +
    the KVs of all layers.
Weights are counted exactly. `bench/RESULTS.md` compares the estimate with the measured peaks (H200, bf16):
within 10% from 256 to 10,000 frames in all three modes (`tests/test_memory.py` holds it to 15%).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from videoxl.config import FRAMES_PER_GROUP, VideoXLConfig
from videoxl.errors import VideoXLMemoryError
from videoxl.language import kv_fp8
from videoxl.language.prompt import SYSTEM_TOKENS, prompt_tokens
from videoxl.prefill.plan import STREAM_TOKENS_PER_SLICE

FRAME_BYTES = 384 * 384 * 3  # one decoded frame, uint8 at the model's size
GiB = 2**30
HEADROOM = 1.20  # on the working memory: allocator fragmentation, and the estimate runs up to 10% low in total
MODES = ("dense", "mask", "streaming", "streaming+offload")
CLI_FLAGS = {"dense": "no --chunk-prefill", "mask": "--chunk-prefill mask",
             "streaming": "--chunk-prefill streaming", "streaming+offload": "--chunk-prefill streaming --offload",
             "mask+offload": "--chunk-prefill mask --offload"}


@dataclass
class Estimate:
    mode: str
    frames: int
    tokens: int
    weights: int  # bytes
    vision: int  # bytes above the weights at the vision peak
    prefill: int  # bytes above the weights at the prefill peak
    question: int = 0  # bytes above the weights while a bi-level question is answered (live sessions)

    @property
    def total(self) -> int:
        return self.weights + max(self.vision, self.prefill, self.question)

    @property
    def working(self) -> int:
        return self.total - self.weights


def estimate(config: VideoXLConfig, frames: int, mode: str, weights: int, tokens: int | None = None,
             frames_per_slice: int = 96, dtype_bytes: int = 2, kv_dtype: str | None = None) -> Estimate:
    """Peak memory of vision + prefill for `frames` frames with `weights` bytes of parameters; `tokens` =
    prompt tokens through the video when known, else from the frame count. `kv_dtype="fp8"`: the KVs stored
    in fp8 (language/kv_fp8.py), and one layer's K/V read back in the model's dtype (twice in the chunked
    modes: `layer_slot`'s buffers and what `commit` returns)."""
    t, v, b = config.text, config.vision, dtype_bytes
    n = tokens if tokens is not None else prompt_tokens(config, frames)
    hidden, mlp = t.hidden_size, t.intermediate_size
    kv_token = t.num_key_value_heads * t.head_dim  # one layer's K (or V) per token, elements
    all_kv = kv_bytes_per_token(config, b, kv_dtype=kv_dtype)
    rope = 2 * t.head_dim * b
    groups = math.ceil(frames / FRAMES_PER_GROUP)
    visual = groups * config.tokens_per_group * hidden * b
    per_frame = (v.image_size // v.patch_size) ** 2 * (6 * v.hidden_size + 2 * v.intermediate_size) * b
    vision = min(frames_per_slice, frames) * per_frame + 2 * visual
    base, offload = mode.split("+")[0], mode.endswith("+offload")
    kv = 2 * kv_bytes_per_token(config, b, 1, kv_dtype) if offload else all_kv  # offload: two GPU staging slots
    if kv_dtype:  # one layer in the model's dtype: `append`'s read back, or `layer_slot`'s buffers
        all_kv += (2 if base == "dense" else 0) * kv_token * b
        kv += (0 if base == "dense" else 2) * kv_token * b
    if base == "dense":
        attention = n * (all_kv + 4 * hidden * b + rope)
        mlp_phase = n * (all_kv + 3 * hidden * b + rope) + min(n, STREAM_TOKENS_PER_SLICE) * 3 * mlp * b
        prefill = max(attention, mlp_phase)
    elif base == "streaming":
        attention = n * (kv + (5 * hidden + 2 * kv_token) * b + rope)
        mlp_phase = n * (kv + 3 * hidden * b + rope) + min(n, STREAM_TOKENS_PER_SLICE) * 3 * mlp * b
        prefill = max(attention, mlp_phase)
    elif base == "mask":
        prefill = n * (kv + (3 * hidden + 3 * mlp) * b + rope)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return Estimate(mode, frames, n, weights, vision, prefill)


def live_estimate(config: VideoXLConfig, frames: int, mode: str, weights: int, frames_per_slice: int = 96,
                  dtype_bytes: int = 2, bilevel: tuple[float, int] | None = None,
                  kv_dtype: str | None = None) -> Estimate:
    """GPU memory of a live session holding `frames` frames, at the peak of an append: its KVs on the GPU (every
    layer's; with offload the two staging slots of one layer that each append reads through, sized to the
    session), plus the larger of a vision slice and one append's pass over its new tokens (a slice of frames:
    hidden states, queries, attention output and MLP of those tokens). `bilevel` (the share of the video kept
    dense, compression): also a question's, `bilevel_question_bytes` beside the KVs."""
    t, b = config.text, dtype_bytes
    n = prompt_tokens(config, frames)
    kv = n * (2 * kv_bytes_per_token(config, b, 1, kv_dtype) if mode.endswith("+offload")
              else kv_bytes_per_token(config, b, kv_dtype=kv_dtype))
    per_slice = min(frames_per_slice, frames)
    vision = estimate(config, per_slice, "dense", weights, None, frames_per_slice, b).vision
    new = prompt_tokens(config, per_slice, 0)
    append = new * (4 * t.hidden_size + 3 * t.intermediate_size) * b
    question = kv + bilevel_question_bytes(config, frames, *bilevel, dtype_bytes, kv_dtype) if bilevel else 0
    return Estimate(f"live {mode}", frames, n, weights, kv + vision, kv + append, question)


def bilevel_question_bytes(config: VideoXLConfig, frames: int, share: float, compression: int,
                           dtype_bytes: int = 2, kv_dtype: str | None = None) -> int:
    """GPU bytes a bi-level question holds beside the video's own KVs (decoding/bilevel.py), kept for follow-ups
    until the video grows: the pooled level (each visual token averaged over `compression`, each other token
    its own slot) and the mixed store it decodes over (the text and timestamps, `share` of the visual tokens
    dense, the rest pooled), K and V of every layer. Activations and the decode graph's workspace are left out:
    on the H200 the first question of a live session (10 min, 25 %, compression 4) kept 1.29 GiB, this gives
    0.94 GiB (tests/test_live.py)."""
    n = prompt_tokens(config, frames)
    visual = math.ceil(frames / FRAMES_PER_GROUP) * config.tokens_per_group
    other = n - visual  # the text before the video and the `Time ...s:` tokens
    level = visual / compression + other
    mixed = other + share * visual + (1 - share) * visual / compression
    return int(kv_bytes_per_token(config, dtype_bytes) * level  # every layer's K and V; the level in the model's
               + kv_bytes_per_token(config, dtype_bytes, kv_dtype=kv_dtype) * mixed)  # dtype, the mixed store as stored


def max_frames(config: VideoXLConfig, budget: int, mode: str, weights: int, frames_per_slice: int = 96,
               dtype_bytes: int = 2, limit: int = 1 << 20, kv_dtype: str | None = None) -> int:
    """The most frames (a multiple of 4) whose estimate, with headroom, fits in `budget` bytes; 0 if none."""
    def fits(frames):
        e = estimate(config, frames, mode, weights, None, frames_per_slice, dtype_bytes, kv_dtype)
        return e.weights + e.working * HEADROOM <= budget

    if not fits(FRAMES_PER_GROUP):
        return 0
    lo, hi = 1, limit // FRAMES_PER_GROUP  # in groups of 4 frames
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * FRAMES_PER_GROUP) else (lo, mid - 1)
    return lo * FRAMES_PER_GROUP


def weight_bytes(shapes: dict[str, tuple], quantize: str | None = None, dtype_bytes: int = 2) -> int:
    """Bytes of a model's parameters (name -> shape, e.g. from a meta-device model) on a GPU, the decoder layers'
    linear weights quantized by `quantize` (None, "int8", "int4", "fp8"; see language/quant.py)."""
    from videoxl.language import quant

    total = 0
    for name, shape in shapes.items():
        if quantize and quant.is_target(name):
            total += quant.stored_bytes(name, shape[0], shape[1], quantize)
        else:
            total += math.prod(shape) * dtype_bytes
    return total


def mode_of(chunking) -> str:
    if chunking is None:
        return "dense"
    return chunking.chunk_prefill_mode + ("+offload" if chunking.offload else "")


def free_bytes(device: torch.device) -> int | None:
    """Memory the next allocations can use on `device`: on a GPU, free on the card + what torch holds but does
    not use; on a CPU, the kernel's MemAvailable (None where it cannot be read)."""
    if device.type != "cuda":
        return host_available()
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def host_available(meminfo: str = "/proc/meminfo") -> int | None:
    """Host RAM that can be had without swapping (Linux's MemAvailable), in bytes; None elsewhere."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_kv_bytes(config: VideoXLConfig, tokens: int, dtype_bytes: int, kv_dtype: str | None = None) -> int:
    """Every layer's K and V for `tokens` tokens: what offload keeps in (pinned) host memory."""
    return kv_bytes_per_token(config, dtype_bytes, kv_dtype=kv_dtype) * tokens


def kv_bytes_per_token(config: VideoXLConfig, dtype_bytes: int, layers: int | None = None,
                       kv_dtype: str | None = None) -> int:
    """K and V of one token in `layers` layers (default: all of them), as stored (`kv_dtype="fp8"`: e4m3 values
    and a scale per token)."""
    t = config.text
    layers = t.num_hidden_layers if layers is None else layers
    if kv_dtype == "fp8":
        return kv_fp8.bytes_per_token(layers, t.num_key_value_heads, t.head_dim)
    return 2 * layers * t.num_key_value_heads * t.head_dim * dtype_bytes


def check_fits(model, frames: int, tokenizer, texts: list[str], chunking, frames_per_slice: int,
               held_frames: int = 0) -> Estimate | None:
    """Stop before any frame is decoded when the estimate does not fit what the device has free (on a CPU: the
    host's available RAM, plus `held_frames` decoded frames held at once, as a folder of images is); with
    offload on a GPU, also the host RAM the offloaded KVs take. The message gives the estimate and a setting that
    would fit. `texts`: the question and the history's turns."""
    available = free_bytes(model.device)
    if available is None:
        return None
    text_tokens = SYSTEM_TOKENS + sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    b = model.dtype.itemsize
    w = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))  # resident (quantized:
    # the weights are buffers)
    mode, kv = mode_of(chunking), model.decoder.kv_dtype
    tokens = prompt_tokens(model.config, frames, text_tokens)
    est = estimate(model.config, frames, mode, w, tokens, frames_per_slice, b, kv)
    cuda = model.device.type == "cuda"
    frames_held = 0 if cuda else held_frames * FRAME_BYTES  # on a GPU, decoded frames wait in host memory
    if est.working * HEADROOM + frames_held > available:
        head = (f"{frames} frames need ~{gib(est.total + frames_held)} in {mode} mode ({gib(est.weights)} weights + "
                f"{gib(est.working + frames_held)} working memory); {gib(available)} free on {model.device} besides "
                "the weights")
        if not cuda:  # chunking modes and offload save GPU memory, not RAM: fewer frames is the setting
            most = max_frames(model.config, w + available - frames_held, mode, w, frames_per_slice, b, kv_dtype=kv)
            raise VideoXLMemoryError(f"{head}; use at most {most} frames (--max-num-frames)")
        raise VideoXLMemoryError(head + "; " + suggestion(model.config, frames, text_tokens, w + available, b, w,
                                                          mode, frames_per_slice, kv))
    host = host_available()
    if mode.endswith("+offload") and host is not None and host_kv_bytes(model.config, tokens, b, kv) > host:
        raise VideoXLMemoryError(f"{frames} frames offload ~{gib(host_kv_bytes(model.config, tokens, b, kv))} of KVs "
                                 f"to host RAM; {gib(host)} available: use fewer frames (--max-num-frames)")
    return est


def gib(x: int) -> str:
    return f"{x / GiB:.1f} GiB"


def suggestion(config, frames, text_tokens, budget, b, w, mode, frames_per_slice, kv_dtype=None) -> str:
    def fits(m, per_slice):
        e = estimate(config, frames, m, w, prompt_tokens(config, frames, text_tokens), per_slice, b, kv_dtype)
        return e.weights + e.working * HEADROOM <= budget

    for m in ("mask", "dense", "streaming", "streaming+offload"):
        if m != mode and fits(m, frames_per_slice if m == "dense" else 24):
            vision = "" if m == "dense" else " --vision-chunk 24"
            return f"use {CLI_FLAGS[m]}{vision} (prefill_config chunk_prefill_mode/offload)"
    for per_slice in (24, 8, 4):
        if fits("streaming+offload", per_slice):
            return (f"use --chunk-prefill streaming --offload --vision-chunk {per_slice} "
                    "(prefill_config chunk_size_for_vision_tower)")
    most = max_frames(config, budget, "streaming+offload", w, 8, b, kv_dtype=kv_dtype)
    if most == 0:
        return "the weights alone leave no room: use a card with more memory"
    return f"use --max-num-frames {most} with --chunk-prefill streaming --offload --vision-chunk 8"


# ---- out of memory ------------------------------------------------------------------------------------------------
def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def memory_errors(device: torch.device, max_num_frames, chunked: bool):
    """Any out-of-memory inside becomes one line that names what to lower."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # the exception tells which memory ran out: with offload, a GPU run can run out of (pinned) host memory
        where = "GPU" if isinstance(e, torch.OutOfMemoryError) or "CUDA" in str(e) else "CPU"
        fix = [f"fewer frames (max_num_frames, now {max_num_frames})"]
        if not chunked:
            fix.append("chunk prefill 'streaming' with offload (CLI: --chunk-prefill streaming --offload)")
        fix.append("a smaller vision batch (chunk_size_for_vision_tower / --vision-chunk, e.g. 8)")
        raise VideoXLMemoryError(f"out of {where} memory while answering; try {', or '.join(fix)}, or a "
                                 "shorter question") from None
