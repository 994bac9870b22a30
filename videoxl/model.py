"""The Video-XL-2 model: its weights (SigLIP + DTS + projector in `vision`, Qwen2 in `decoder`) and the model
card's `chat` / `stream_chat`, which check their arguments and settings and run `pipeline.answer`.

A video's prefix KVs (system prompt + video) are kept in `model.kv_cache` (cache/store.py), so a later question
on the same video with the same settings only prefills its own text. One question runs at a time per model (a
lock): the KV cache and the decoder's state are shared, so concurrent calls are served one after the other.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from torch import nn

from videoxl import pipeline
from videoxl.cache.identity import weights_digest
from videoxl.cancel import Cancel
from videoxl.devices import on_device
from videoxl.cache.store import VideoKVCache
from videoxl.config import VideoXLConfig
from videoxl.errors import VideoXLError
from videoxl.inputs import check_history, check_request, history_messages
from videoxl.language.decoder import Qwen2Decoder
from videoxl.language.kv_store import KVStore
from videoxl.language.prompt import VideoPrompt
from videoxl.memory import memory_errors
from videoxl.prefill.plan import PrefillConfig
from videoxl.prefill.growing import embed_prompt
from videoxl.prefill.run import prefill
from videoxl.settings import Settings
from videoxl.video.stream import Clip, FrameStream
from videoxl.vision.encoder import VisionEncoder
from videoxl.vision.stream import encode_stream


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
        self.prefetched = None  # a video/prefetch.Prefetch decoding the next question's frames (chat's CLI)
        self._digest: tuple[tuple, str] | None = None

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def weights_digest(self) -> str:
        """A digest of the weights (cache/identity.py), part of every video cache key. Recomputed whenever a
        parameter changed: every in-place write (`load_state_dict`, an optimiser step) bumps its version."""
        tensors = list(self.state_dict(keep_vars=True).values())
        version = tuple((id(t), t._version) for t in tensors)
        if self._digest is None or self._digest[0] != version:
            self._digest = (version, weights_digest(self))
        return self._digest[1]

    # ---- the model card's API -------------------------------------------------------------------------------
    def chat(self, video_path, tokenizer, question: str, chat_history=None, return_history: bool = False,
             max_num_frames: int = 150, sample_fps: float | None = 1, max_sample_fps: float | None = None,
             generation_config: dict | None = None, show_progress: bool = False,
             on_text: Callable[[str], None] | None = None, settings: Settings | None = None, *,
             system: str | None = None, cancel: Cancel | None = None):
        """Answer `question` about a video (path, image, folder of images, or a list of images).

        `chat_history` is what a previous call returned with `return_history=True` (a list of
        {"role", "content"} messages), or a list of (question, answer) pairs. `on_text` receives the answer
        piece by piece as it is generated. `settings` (videoxl.settings.Settings) replaces the card's switches
        on `model.config` for this question; `generation_config`, when given, replaces its generation keys.
        `system` replaces the default system message. `cancel` (videoxl.cancel.Cancel) stops the question at the
        next stage check (frame batch, vision layer, prefill layer or block, token) with `Cancelled` / `TimedOut`.
        """
        pieces = []
        for piece in self.stream_chat(video_path, tokenizer, question, chat_history, max_num_frames, sample_fps,
                                      max_sample_fps, generation_config, show_progress, settings=settings,
                                      system=system, cancel=cancel):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        answer = "".join(pieces)
        if not return_history:
            return answer
        return answer, history_messages(check_history(chat_history) + [(question, answer)])

    def stream_chat(self, video_path, tokenizer, question: str, chat_history=None, max_num_frames: int = 150,
                    sample_fps: float | None = 1, max_sample_fps: float | None = None,
                    generation_config: dict | None = None, show_progress: bool = False,
                    settings: Settings | None = None, *, system: str | None = None,
                    cancel: Cancel | None = None) -> Iterator[str]:
        """`chat`, yielding the answer's text as it is generated."""
        if settings is None:
            settings = Settings.from_card(self.config, generation_config)
        elif not isinstance(settings, Settings):
            raise VideoXLError(f"settings must be a videoxl.settings.Settings, got {type(settings).__name__}")
        else:
            settings = settings.with_generation(generation_config)
        r = check_request(self.config, tokenizer, video_path, question, chat_history, max_num_frames, sample_fps,
                          max_sample_fps, system)
        with self._exclusive(), on_device(self.device), torch.inference_mode(), \
                memory_errors(self.device, r.max_num_frames, bool(settings.prefill)):
            yield from pipeline.answer(self, tokenizer, r, settings, show_progress, cancel)

    def open_live(self, tokenizer, sample_fps: float = 1.0, **settings):
        """A live session: frames appended as they are recorded, questions about everything so far
        (videoxl.live.LiveSession: its settings, limits and thread safety are described there)."""
        from videoxl.live.session import LiveSession  # the live layer sits above the model; imported on use

        return LiveSession(self, tokenizer, sample_fps=sample_fps, **settings)

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

    # ---- the stages, for tests and benchmarks (the pipeline calls the stage functions directly) ---------------
    def encode_clip(self, clip: Clip, frames_per_slice: int = pipeline.DEFAULT_FRAMES_PER_SLICE,
                    show_progress=False) -> torch.Tensor:
        """Decoded frames -> visual tokens [groups, tokens_per_group, hidden]."""
        return self.encode_stream(FrameStream.from_clip(clip), frames_per_slice, show_progress)

    def encode_stream(self, stream: FrameStream, frames_per_slice: int = pipeline.DEFAULT_FRAMES_PER_SLICE,
                      show_progress=False, cancel: Cancel | None = None) -> torch.Tensor:
        return encode_stream(self.vision, stream, frames_per_slice, self.device, show_progress, cancel=cancel)

    def embed_prompt(self, prompt: VideoPrompt, visual: torch.Tensor, end: int | None = None) -> torch.Tensor:
        return embed_prompt(self.decoder, prompt, visual, end)

    def prefill(self, embeds: torch.Tensor, store: KVStore, prompt: VideoPrompt,
                chunking: PrefillConfig | None = None, show_progress=False) -> dict:
        return prefill(self.decoder, embeds, store, prompt, chunking, show_progress)

    def _placeholder_id(self, tokenizer) -> int:
        return pipeline.placeholder_id(self.config, tokenizer)
