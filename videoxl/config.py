"""Typed configs read from a checkpoint's `config.json`, validated once at load.

The released Video-XL-2 `config.json` holds the Qwen2 keys at top level plus LLaVA `mm_*` keys. It does not
describe the vision tower beyond its name (`mm_vision_tower`), so SigLIP so400m's shape is the default here; our
tiny test checkpoints add a `vision_config` dict (a key the released file simply lacks) to shrink it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

from videoxl.errors import VideoXLError

FRAMES_PER_GROUP = 4  # DTS fuses 4 consecutive frames into one set of tokens; timestamps go before each group
DTS_GRID = 24  # the 27x27 SigLIP patch grid is resized to 24x24 before DTS


def settings_from_dict(cls, d: dict | None, name: str):
    """A settings dataclass from a user's dict (`prefill_config`, `sparse_config`): not a dict, or a key the class
    does not have, is one clear error; the class's `validate()` checks the values."""
    if d is None:
        cfg = cls()
    elif not isinstance(d, dict):
        raise VideoXLError(f"{name} must be a dict, got {type(d).__name__}")
    else:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VideoXLError(f"unknown {name} key(s) {unknown}; allowed: {sorted(known)}")
        cfg = cls(**d)
    cfg.validate()
    return cfg


@dataclass
class TextConfig:
    """Qwen2 decoder shape (the checkpoint's top-level keys)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768  # the context Qwen2.5-7B was trained for (caps the question's length)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """SigLIP vision tower shape. `num_hidden_layers` is the *pretrained* depth; the model runs one layer fewer."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def layers_run(self) -> int:
        # The reference deletes the last encoder layer (`del layers[-1:]`) and reads the output of the one before.
        return self.num_hidden_layers - 1

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class VideoXLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mm_hidden_size: int = 1152
    mm_projector_type: str = "mlp2x_gelu"
    mm_spatial_pool_stride: int = 2
    mm_spatial_pool_mode: str = "average"
    mm_vision_tower: str = "google/siglip-so400m-patch14-384"
    # Runtime switches from the model card. They live on the config because the card sets them there.
    enable_chunk_prefill: bool = False
    prefill_config: dict | None = None
    enable_sparse: bool = False
    sparse_config: dict | None = None  # bi-level decoding settings (decoding/sparse_config.py)
    random_weights: bool = False  # written by `videoxl make-tiny` (key `videoxl_random_weights`): say so to users

    @property
    def tokens_per_group(self) -> int:
        side = DTS_GRID // self.mm_spatial_pool_stride
        return side * side  # 144 for the released model

    @classmethod
    def from_dict(cls, d: dict) -> "VideoXLConfig":
        text = TextConfig(**{f.name: d[f.name] for f in fields(TextConfig) if f.name in d})
        vd = d.get("vision_config") or {}
        vision = VisionConfig(**{f.name: vd[f.name] for f in fields(VisionConfig) if f.name in vd})
        cfg = cls(
            text=text,
            vision=vision,
            mm_hidden_size=d.get("mm_hidden_size", vision.hidden_size),
            mm_projector_type=d.get("mm_projector_type", "mlp2x_gelu"),
            # The reference evaluation forces stride 2 / average whatever the file says; we read them but
            # validate below that they are the values the released weights were trained with.
            mm_spatial_pool_stride=d.get("mm_spatial_pool_stride", 2) or 2,
            mm_spatial_pool_mode=d.get("mm_spatial_pool_mode", "average") or "average",
            mm_vision_tower=d.get("mm_vision_tower", "google/siglip-so400m-patch14-384"),
            random_weights=d.get("videoxl_random_weights") is True,
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str) -> "VideoXLConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise VideoXLError(f"checkpoint has no config.json: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VideoXLError(f"config.json is not valid JSON ({path}): {e}") from None
        if not isinstance(d, dict):
            raise VideoXLError(f"config.json must hold a JSON object: {path}")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise VideoXLError(f"config.json has a value of the wrong type ({path}): {e}") from None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self.text, f.name) for f in fields(TextConfig)}
        d.update(
            architectures=["LlavaQwenForCausalLM"],
            model_type="llava_qwen",
            mm_hidden_size=self.mm_hidden_size,
            mm_projector_type=self.mm_projector_type,
            mm_spatial_pool_stride=self.mm_spatial_pool_stride,
            mm_spatial_pool_mode=self.mm_spatial_pool_mode,
            mm_vision_tower=self.mm_vision_tower,
            mm_vision_select_layer=-2,
            mm_patch_merge_type="unires",
            image_aspect_ratio="pad",
            vision_config={f.name: getattr(self.vision, f.name) for f in fields(VisionConfig)},
        )
        if self.random_weights:
            d["videoxl_random_weights"] = True
        return d

    def validate(self) -> None:
        t, v = self.text, self.vision
        positive = {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
            "vision_config.hidden_size": v.hidden_size,
            "vision_config.num_hidden_layers": v.num_hidden_layers, "mm_hidden_size": self.mm_hidden_size,
        }
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise VideoXLError(f"config.json: {key} must be a positive integer, got {value!r}")
        if t.hidden_size % t.num_attention_heads:
            raise VideoXLError(
                f"config.json: hidden_size ({t.hidden_size}) must be divisible by num_attention_heads "
                f"({t.num_attention_heads})")
        if t.num_attention_heads % t.num_key_value_heads:
            raise VideoXLError(
                f"config.json: num_attention_heads ({t.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({t.num_key_value_heads})")
        if v.num_hidden_layers < 2:
            raise VideoXLError("config.json: vision_config.num_hidden_layers must be at least 2 (the last is dropped)")
        if self.mm_hidden_size != v.hidden_size:
            raise VideoXLError(
                f"config.json: mm_hidden_size ({self.mm_hidden_size}) must equal the vision width ({v.hidden_size})")
        if self.mm_hidden_size % 32:
            raise VideoXLError(f"config.json: mm_hidden_size must be a multiple of 32 (DTS GroupNorm), got "
                               f"{self.mm_hidden_size}")
        if self.mm_projector_type != "mlp2x_gelu":
            raise VideoXLError(f"config.json: mm_projector_type must be 'mlp2x_gelu', got {self.mm_projector_type!r}")
        if self.mm_spatial_pool_mode != "average":
            raise VideoXLError(
                f"config.json: mm_spatial_pool_mode must be 'average', got {self.mm_spatial_pool_mode!r}")
        if self.mm_spatial_pool_stride not in (1, 2, 3, 4, 6, 8, 12, 24):
            raise VideoXLError(
                f"config.json: mm_spatial_pool_stride must divide 24, got {self.mm_spatial_pool_stride!r}")
        if not (isinstance(t.rope_theta, (int, float)) and t.rope_theta > 0):
            raise VideoXLError(f"config.json: rope_theta must be a positive number, got {t.rope_theta!r}")


def config_path(model_dir: str) -> str:
    return os.path.join(model_dir, "config.json")
