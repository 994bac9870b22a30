"""The Video-XL-2 model and its `chat` call, a thin layer over the components:

    video.load_video -> vision.VisionEncoder.encode -> prompt.build_prompt -> prefill -> generate -> text

A video's prefix KVs (system prompt + video) are kept in `model.kv_cache` (video_kv.py), so a later question on
the same video with the same settings only prefills its own text. One question runs at a time per model (a lock):
the KV cache and the decoder's state are shared, so concurrent calls are served one after the other, never mixed.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Callable, Iterator

import torch
from torch import nn

from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.cancel import Cancel, next_batch
from videoxl.config import VideoXLConfig
from videoxl.language.decoder import Qwen2Decoder
from videoxl.errors import VideoXLError
from videoxl.decoding import decode_step, generate_tokens
from videoxl.decoding.bilevel import bilevel_question
from videoxl.decoding.sparse_config import SparseConfig
from videoxl.decoding.generation import Detokenizer, GenerationConfig
from videoxl.inputs import answer_stats, check_history, check_request, history_messages, memory_errors
from videoxl.language.kv_store import KVStore
from videoxl.prefill.modes import dense_prefill, mask_prefill, streaming_prefill
from videoxl.language.prompt import VideoPrompt, build_prompt
from videoxl.video.sources import Clip, FrameStream, SideStream
from videoxl.cache.store import DEFAULT_FRAMES_PER_SLICE, VideoKVCache, video_prefix
from videoxl.vision.encoder import VisionEncoder

VISION_PAD = "<|vision_pad|>"
LONG_PREFILL_TOKENS = 20000  # show a prefill progress bar above this


def progress(iterable, total: int | None, desc: str, enabled):
    """A tqdm bar on stderr when `enabled` is True or a collection naming `desc` ("vision", "prefill", ...).
    With `iterable=None`, a bar to advance by hand (`bar.update_to(n)`), or None when disabled."""
    if not (enabled is True or (enabled and not isinstance(enabled, bool) and desc in enabled)):
        return iterable
    from tqdm import tqdm

    bar = tqdm(iterable, total=total, desc=desc, unit="", leave=False, dynamic_ncols=True)
    bar.update_to = lambda n: bar.update(n - bar.n)
    return bar


def close(bar) -> None:
    if bar is not None:
        bar.close()


class VideoXL(nn.Module):
    def __init__(self, config: VideoXLConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config)
        self.decoder = Qwen2Decoder(config.text)
        self.kv_cache = VideoKVCache()  # keeps the latest video; `videoxl.load(kv_cache_gb=, kv_cache_dir=)`
        self.last_stats: dict = {}
        self._lock, self._lock_owner = threading.Lock(), None
        self.decode_mode = "auto"  # 'captured' (CUDA graph), 'eager', or 'auto': captured where it can run
        self._t_question = 0.0

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # ---- the model card's API -------------------------------------------------------------------------------
    def chat(self, video_path, tokenizer, question: str, chat_history=None, return_history: bool = False,
             max_num_frames: int = 150, sample_fps: float | None = 1, max_sample_fps: float | None = None,
             generation_config: dict | None = None, show_progress: bool = False,
             on_text: Callable[[str], None] | None = None, *, system: str | None = None,
             cancel: Cancel | None = None):
        """Answer `question` about a video (path, image, folder of images, or a list of images).

        `chat_history` is what a previous call returned with `return_history=True` (a list of
        {"role", "content"} messages), or a list of (question, answer) pairs. `on_text` receives the answer
        piece by piece as it is generated. `system` replaces the default system message. `cancel` (a
        `videoxl.cancel.Cancel`) stops the question at the next stage check (frame decoding, vision batch,
        prefill layer, token) with `Cancelled` / `TimedOut`.
        """
        pieces = []
        for piece in self.stream_chat(video_path, tokenizer, question, chat_history, max_num_frames, sample_fps,
                                      max_sample_fps, generation_config, show_progress, system=system,
                                      cancel=cancel):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        answer = "".join(pieces)
        if not return_history:
            return answer
        return answer, history_messages(check_history(chat_history) + [(question, answer)])

    def stream_chat(self, video_path, tokenizer, question: str, chat_history=None, max_num_frames: int = 150,
                    sample_fps: float | None = 1, max_sample_fps: float | None = None,
                    generation_config: dict | None = None, show_progress: bool = False, *,
                    system: str | None = None, cancel: Cancel | None = None) -> Iterator[str]:
        """`chat`, yielding the answer's text as it is generated."""
        r = check_request(self.config, tokenizer, video_path, question, chat_history, max_num_frames, sample_fps,
                          max_sample_fps, generation_config, system)
        chunking, sparse = self._check_runtime_settings()
        # kernels launched without a device (Triton's) go to the current GPU; not enough yet for a model on a
        # second GPU of one process (a known bug: tests/test_gpu.py, its strict xfail)
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with self._exclusive(), on_device, torch.inference_mode(), \
                memory_errors(self.device, r.max_num_frames, bool(chunking)):
            self._t_question = time.perf_counter()  # inside the lock: waiting for another question is not ours
            prefix = video_prefix(self, r.video, tokenizer, question, r.history,
                                  (r.max_num_frames, r.sample_fps, r.max_sample_fps), chunking, show_progress,
                                  cancel, r.system)
            prompt = build_prompt(tokenizer, question, prefix.prompt.timestamps, self.config.tokens_per_group,
                                  self._placeholder_id(tokenizer), r.history, r.system)
            cache = prefix.cache
            cache.truncate(prompt.video_end)
            tail = torch.tensor(prompt.input_ids[prompt.video_end:], device=self.device)
            self.last_stats = answer_stats(prefix.stats, prefix.stats["kv_cache"] != "miss", len(prompt))
            if sparse is None:
                logits = self.decoder(self.decoder.embed_tokens(tail)[None], cache)
            else:  # the question and answer run over a mixed dense/pooled copy; the video's store stays whole
                cache, logits, info = bilevel_question(self.decoder, cache, tail, sparse, prompt.timestamps,
                                                       chunking.groups_per_block, r.gen.max_new_tokens, cancel)
                self.last_stats.update(info)
                self.kv_cache.trim()
            yield from self._generate(logits, cache, tokenizer, r.gen, prompt.input_ids, show_progress, cancel)
            self.kv_cache.persist_pending()  # to disk, after the answer

    @contextlib.contextmanager
    def _exclusive(self):
        if self._lock_owner == threading.get_ident():  # waiting would deadlock this thread
            raise VideoXLError("a chat on this model is still open in this thread (an unfinished stream_chat); "
                               "finish or close it first")
        with self._lock:
            self._lock_owner = threading.get_ident()
            try:
                yield
            finally:
                self._lock_owner = None

    # ---- steps ------------------------------------------------------------------------------------------------
    def _check_runtime_settings(self) -> tuple[PrefillConfig | None, SparseConfig | None]:
        """The card's runtime switches, validated: chunk-prefill settings (None: dense prefill) and bi-level
        decoding settings (None: dense decoding)."""
        if not isinstance(self.config.enable_sparse, bool) or not isinstance(self.config.enable_chunk_prefill, bool):
            raise VideoXLError("enable_sparse and enable_chunk_prefill must be True or False")
        sparse = SparseConfig.from_dict(self.config.sparse_config) if self.config.enable_sparse else None
        if not self.config.enable_chunk_prefill:
            if sparse is not None:
                raise VideoXLError("enable_sparse (bi-level KV decoding) needs chunk prefill: set "
                                   "model.config.enable_chunk_prefill = True (its blocks are what is kept dense)")
            return None, None
        return PrefillConfig.from_dict(self.config.prefill_config), sparse

    def _placeholder_id(self, tokenizer) -> int:
        pad = tokenizer.convert_tokens_to_ids(VISION_PAD)
        return pad if isinstance(pad, int) and 0 <= pad < self.config.text.vocab_size else 0

    def encode_clip(self, clip: Clip, frames_per_slice: int = DEFAULT_FRAMES_PER_SLICE,
                    show_progress=False, cancel: Cancel | None = None) -> torch.Tensor:
        """Decoded frames -> visual tokens [groups, tokens_per_group, hidden]."""
        return self.encode_stream(FrameStream.from_clip(clip), frames_per_slice, show_progress, cancel)

    def encode_stream(self, stream: FrameStream, frames_per_slice: int = DEFAULT_FRAMES_PER_SLICE,
                      show_progress=False, cancel: Cancel | None = None) -> torch.Tensor:
        """Frames -> visual tokens, `frames_per_slice` at a time, while a thread decodes the next slice (PyAV
        and PIL release the GIL while they work, so decoding and the GPU overlap)."""
        batches: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def decode():
            try:
                for frames in stream.batches(frames_per_slice, cancel):
                    while not stop.is_set():
                        try:
                            batches.put(frames, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                batches.put(None)
            except BaseException as e:  # handed to the consumer, raised there
                batches.put(e)

        worker = threading.Thread(target=decode, name="videoxl-decode", daemon=True)
        worker.start()
        bar = progress(None, -(-len(stream.planned) // frames_per_slice), "vision", show_progress)
        parts, side = [], SideStream(self.device)
        try:
            while (item := next_batch(batches, cancel)) is not None:
                if isinstance(item, BaseException):
                    raise item
                parts.extend(side.run(lambda f: self.vision.encode(f, frames_per_slice, cancel), item))
                if bar is not None:
                    bar.update(1)
        finally:
            stop.set()
            close(bar)
        worker.join(), side.join()
        return torch.cat(parts, dim=0)

    def embed_prompt(self, prompt: VideoPrompt, visual: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """Token embeddings [1, n, hidden] of the prompt up to `end`, visual positions filled in."""
        ids = torch.tensor(prompt.input_ids[:end], device=self.device)
        embeds = self.decoder.embed_tokens(ids)
        pos = torch.tensor(prompt.visual_positions, device=self.device)
        embeds[pos] = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
        return embeds[None]

    def prefill(self, embeds: torch.Tensor, store: KVStore, prompt: VideoPrompt,
                chunking: PrefillConfig | None = None, show_progress=False, cancel: Cancel | None = None) -> dict:
        """Fill `store` with the KVs of `embeds` (the prompt up to the end of the video); returns stats."""
        long = embeds.shape[1] > LONG_PREFILL_TOKENS
        bar = progress(None, len(self.decoder.layers), "prefill", show_progress if long else False)
        on_layer = (lambda i: bar.update_to(i + 1)) if bar else None
        try:
            if chunking is None:
                dense_prefill(self.decoder, embeds, store, on_layer, cancel)
                return {"prefill": "dense", "attended_share": 1.0}
            plan = BlockPlan.from_prompt(prompt, chunking)
            store.plan = plan
            if chunking.chunk_prefill_mode == "mask":
                mask_prefill(self.decoder, embeds, store, plan, cancel)
            else:
                streaming_prefill(self.decoder, embeds, store, plan, on_layer, cancel)
        finally:
            close(bar)
        return {"prefill": chunking.chunk_prefill_mode, "blocks": len(plan.blocks),
                "attended_share": round(plan.attended_share(), 4), "offload": chunking.offload}

    def _generate(self, logits: torch.Tensor, cache: KVStore, tokenizer, gen: GenerationConfig,
                  prompt_ids: list[int], show_progress: bool, cancel: Cancel | None = None) -> Iterator[str]:
        stop = {i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
                if isinstance(i, int)}
        step = decode_step(self.decoder, cache, gen.max_new_tokens, self.decode_mode)
        self.last_stats.update(decode_path=type(step).__name__.replace("Step", "").lower(),
                               capture_s=None if step.capture_s is None else round(step.capture_s, 3))
        detok = Detokenizer(tokenizer)
        bar = progress(None, gen.max_new_tokens, "decode", show_progress)
        first = True
        try:
            for token in generate_tokens(step, logits, gen, prompt_ids, stop, self.config.text.vocab_size,
                                         self.last_stats, cancel):
                if first:
                    self.last_stats["ttft_s"] = round(time.perf_counter() - self._t_question, 3)
                    first = False
                if bar is not None:
                    bar.update(1)
                piece = detok.add(token)
                if piece:
                    yield piece
        finally:
            close(bar)
        rest = detok.flush()
        if rest:
            yield rest
