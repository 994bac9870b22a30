"""Token generation settings (the next-token choice: `decoding/sampling.py`; text: `decoding/detokenize.py`).

Semantics follow `transformers`' generation keys so the model card's `generation_config` dicts work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


from videoxl.errors import VideoXLError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    use_cache: bool = True  # accepted for compatibility; the cache is always used
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "GenerationConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VideoXLError(f"unknown generation_config key(s) {unknown}; allowed: {sorted(known)}")
        d = {k: v for k, v in d.items() if v is not None}
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(key, rule):
            raise VideoXLError(f"generation_config: {key} {rule}, got {getattr(self, key)!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be a positive integer")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            bad("num_beams", "must be a positive integer")
        if self.num_beams > 1:
            raise VideoXLError("generation_config: num_beams > 1 (beam search) is not supported; use num_beams=1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a number > 0")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
