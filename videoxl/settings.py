"""A question's settings, validated once where they enter: how to prefill, how to decode, how to generate.

Front-ends build one from their options (`cli/options.py`, shared by `chat`, `serve` and `batch`) and pass it
down; nothing writes them into the checkpoint's config. The model card's own switches
(`model.config.enable_chunk_prefill`, `prefill_config`, `enable_sparse`, `sparse_config`) are the card's API
and keep working: when no settings are passed, they are read into one of these per question.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from videoxl.decoding.generation import GenerationConfig
from videoxl.decoding.sparse_config import SparseConfig
from videoxl.errors import VideoXLError
from videoxl.prefill.plan import PrefillConfig


@dataclass(frozen=True)
class Settings:
    prefill: PrefillConfig | None = None  # None: dense prefill
    sparse: SparseConfig | None = None  # None: dense decoding (bi-level needs chunk prefill's blocks)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    @classmethod
    def build(cls, prefill_config: Mapping | None = None, sparse_config: Mapping | None = None,
              generation_config: Mapping | None = None) -> "Settings":
        """From the card's dicts (None: dense prefill / dense decoding / default generation)."""
        if generation_config is not None and not isinstance(generation_config, Mapping):
            raise VideoXLError(f"generation_config must be a dict (or None), got {type(generation_config).__name__}")
        if sparse_config is not None and prefill_config is None:
            raise VideoXLError("enable_sparse (bi-level KV decoding) needs chunk prefill: set "
                               "model.config.enable_chunk_prefill = True (its blocks are what is kept dense)")
        return cls(None if prefill_config is None else PrefillConfig.from_dict(prefill_config),
                   None if sparse_config is None else SparseConfig.from_dict(sparse_config),
                   GenerationConfig.from_dict(dict(generation_config or {})))

    @classmethod
    def from_card(cls, config, generation_config: Mapping | None = None) -> "Settings":
        """The model card's runtime switches on `config`, read now (they may change between questions)."""
        if not isinstance(config.enable_sparse, bool) or not isinstance(config.enable_chunk_prefill, bool):
            raise VideoXLError("enable_sparse and enable_chunk_prefill must be True or False")
        def given(d):  # an enabled switch without its dict means the defaults
            return {} if d is None else d

        return cls.build(given(config.prefill_config) if config.enable_chunk_prefill else None,
                         given(config.sparse_config) if config.enable_sparse else None, generation_config)

    def with_generation(self, generation_config: Mapping | None) -> "Settings":
        """These settings with another question's generation keys (None: keep them)."""
        if generation_config is None:
            return self
        return Settings(self.prefill, self.sparse, Settings.build(generation_config=generation_config).generation)
