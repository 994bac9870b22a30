"""The eager decode step: the decoder's plain forward for one token through the KV store. It runs everywhere
(CPU, offloaded KVs) and is the reference the captured step is tested against."""
from __future__ import annotations

import torch

from videoxl.language.decoder import Qwen2Decoder
from videoxl.language.kv_store import KVStore


class EagerStep:
    capture_s = None

    def __init__(self, decoder: Qwen2Decoder, cache: KVStore):
        self.decoder, self.cache = decoder, cache
        self.start_length = cache.length

    def start(self) -> None:
        self.start_length = self.cache.length

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decoder.embed_tokens(token.view(1, 1)), self.cache)[0]

    def finish(self, written: int) -> None:
        # a step already fed may be past the end (a stop token seen after the next step was queued)
        self.cache.truncate(self.start_length + written)
