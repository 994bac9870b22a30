"""The next-token choice on the device: greedy, temperature, top-k, top-p, repetition penalty, seeded.

Nothing here reads a value back to the host, so a decode loop pays one host sync per token (to stream text
and see stop tokens) and no more. Semantics follow `transformers`' logits processors, in their order:
repetition penalty, temperature, top-k, top-p.
"""
from __future__ import annotations

import torch

from videoxl.decoding.generation import GenerationConfig


class Sampler:
    def __init__(self, cfg: GenerationConfig, vocab_size: int, device: torch.device, prompt_ids: list[int]):
        self.cfg = cfg
        self.seen = None
        if cfg.repetition_penalty != 1.0:
            # a mask over the vocabulary, not a growing list: the penalty applies once per distinct token either way
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids, device=device, dtype=torch.long)] = True
        self.generator = None
        if not cfg.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] or [1, vocab] (fp32) -> the next token, a one-element long tensor on the device."""
        logits = self.filter(logits)
        if self.cfg.greedy:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(logits.softmax(-1), 1, generator=self.generator).view(1)
        if self.seen is not None:
            self.seen[token] = True
        return token

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits [1, vocab] the token is drawn from: penalised, scaled, and cut to top-k / top-p."""
        cfg = self.cfg
        logits = logits.reshape(1, -1)
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if not cfg.greedy:
            logits = logits / cfg.temperature
            if cfg.top_k > 0:
                kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if cfg.top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                probs = sorted_logits.softmax(-1)
                # drop a token once the mass *before* it already reaches top_p (the first token always stays)
                drop = (probs.cumsum(-1) - probs) >= cfg.top_p
                logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return logits
