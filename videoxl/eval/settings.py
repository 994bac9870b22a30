"""`--model_args` of the lmms-eval plugin, parsed once into typed `EvalSettings`; bad input is one `VideoXLError`.

    --model videoxl --model_args pretrained=PATH,frames=400,fps=1,max_fps=4,chunk_prefill=streaming,block=4,prev=3
    --model videoxl --model_args pretrained=PATH,preset=videomme_chunk       (a preset, then any key overrides it)

lmms-eval hands the values over already converted ("true" -> True, "4" -> 4), a Python caller may give strings:
both are accepted. `block` / `prev` are the authors' names (blocks of `block` groups of 4 frames, each seeing
`prev` previous blocks); they map onto the model card's `step_size = block`, `chunk_size = block * (prev + 1)`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from videoxl.errors import VideoXLError

CHUNK_MODES = ("none", "streaming", "mask")
# lmms-eval passes these to every model (from its own command line); the plugin reads `device`, ignores the rest
LMMS_EVAL_EXTRAS = ("batch_size", "max_batch_size")


@dataclass(frozen=True)
class EvalSettings:
    pretrained: str = ""
    frames: int = 150  # max_num_frames
    fps: float | None = 1.0  # sample_fps; None: `frames` frames evenly spaced
    max_fps: float | None = None  # max_sample_fps
    chunk_prefill: str = "none"  # none | streaming | mask
    block: int = 4  # groups of 4 frames per prefill block (the card's step_size)
    prev: int = 3  # previous blocks each block sees (chunk_size = block * (prev + 1))
    vision_chunk: int = 24  # frames per vision-tower pass with chunk prefill (chunk_size_for_vision_tower)
    offload: bool = False
    bilevel_budget: float | None = None  # bi-level KV decoding: share (or number) of blocks kept dense; None: off
    bilevel_compression: int = 4
    dtype: str | None = None  # default: bfloat16 on a GPU, float32 on the CPU
    device: str | None = None
    kv_cache_dir: str | None = None  # prefix KVs on disk: a second run answers known videos without prefill
    kv_cache_gb: float = 0.0  # memory for prefix KVs beyond the latest video's
    max_new_tokens: int = 256  # when a task's generation_kwargs do not say
    quantize: str | None = None  # the decoder layers' weights: int8 | int4 | fp8 (videoxl.load's quantize)
    kv_dtype: str | None = None  # fp8: the KV cache in e4m3 (videoxl.load's kv_dtype)

    @property
    def sampling(self) -> tuple:
        return self.frames, self.fps, self.max_fps

    def prefill_config(self) -> dict | None:
        if self.chunk_prefill == "none":
            return None
        return {"chunk_prefill_mode": self.chunk_prefill, "chunk_size": self.block * (self.prev + 1),
                "step_size": self.block, "offload": self.offload, "chunk_size_for_vision_tower": self.vision_chunk}

    def load_kwargs(self) -> dict:
        """`videoxl.load`'s arguments besides the folder."""
        return {"device": self.device, "dtype": self.dtype, "kv_cache_gb": self.kv_cache_gb,
                "kv_cache_dir": self.kv_cache_dir, "quantize": self.quantize, "kv_dtype": self.kv_dtype}

    def model_settings(self):
        """The model's validated per-question settings (videoxl.settings.Settings), passed to every `chat`: the
        checkpoint's config is left alone."""
        from videoxl.settings import Settings

        sparse = None if self.bilevel_budget is None else {"budget": self.bilevel_budget,
                                                            "compression": self.bilevel_compression}
        return Settings.build(self.prefill_config(), sparse)


def _chunk(frames, block, prev, **more) -> dict:
    return dict(frames=frames, fps=1.0, max_fps=4.0, chunk_prefill="streaming", block=block, prev=prev, **more)


def _pure(frames) -> dict:
    return dict(frames=frames, fps=1.0, max_fps=4.0)


# The authors' settings (their logs; issue 23's table). "*_bilevel" runs OUR bi-level decoding over their
# chunking: the authors' bi-level copy read chunk lists precomputed offline by another model, which we do not have.
PRESETS: dict[str, dict] = {
    "videomme_pure": _pure(400), "mlvu_pure": _pure(256), "longvideobench_pure": _pure(400),
    "lvbench_pure": _pure(600),
    "videomme_chunk": _chunk(300, 4, 3), "mlvu_chunk": _chunk(256, 4, 3), "longvideobench_chunk": _chunk(400, 6, 5),
    "lvbench_chunk": _chunk(600, 4, 11),
    "videomme_bilevel": _chunk(400, 4, 3, bilevel_budget=0.25), "mlvu_bilevel": _chunk(256, 4, 3, bilevel_budget=0.25),
    "longvideobench_bilevel": _chunk(400, 4, 3, bilevel_budget=0.25),
    "shapes": dict(frames=2048, fps=1.0, max_fps=None),  # the local task: every frame of a 1-fps file
}


def parse_model_args(args: dict | str) -> EvalSettings:
    """`pretrained=PATH,preset=...,key=value` (a string, or the dict lmms-eval makes of it) -> EvalSettings."""
    if isinstance(args, str):
        args = _split(args)
    args = {k: v for k, v in args.items() if k not in LMMS_EVAL_EXTRAS}
    values: dict = {}
    preset = args.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise VideoXLError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    known = {f.name: f for f in fields(EvalSettings)}
    for key, raw in args.items():
        if key not in known:
            raise VideoXLError(f"unknown model_args key {key!r}; keys: preset, {', '.join(known)}")
        values[key] = _convert(key, raw, known[key].type)
    s = replace(EvalSettings(), **values)
    _check(s)
    return s


def _split(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise VideoXLError(f"model_args must be key=value pairs separated by commas, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _convert(key: str, raw, kind: str):
    """One value to the field's type; strings as lmms-eval's command line gives them."""
    optional = "None" in kind
    if isinstance(raw, str) and raw.lower() in ("none", "null", "") and optional:
        return None
    if raw is None and optional:
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
                return raw.lower() in ("true", "1")
            if isinstance(raw, bool):
                return raw
            raise ValueError
        if kind.startswith("int"):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind.startswith("float"):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        what = {"bool": "true or false", "int": "an integer", "float": "a number"}[kind.split(" ")[0]]
        raise VideoXLError(f"model_args {key} must be {what}{' or none' if optional else ''}, got {raw!r}") \
            from None


def _check(s: EvalSettings) -> None:
    if not s.pretrained:
        raise VideoXLError("model_args needs pretrained=PATH (a Video-XL-2 checkpoint folder)")
    if not os.path.isdir(s.pretrained):
        raise VideoXLError(f"model_args pretrained={s.pretrained!r} is not a folder")
    for key in ("frames", "block", "bilevel_compression", "max_new_tokens"):
        if getattr(s, key) < 1:
            raise VideoXLError(f"model_args {key} must be >= 1, got {getattr(s, key)}")
    if s.prev < 0:
        raise VideoXLError(f"model_args prev must be >= 0, got {s.prev}")
    for key in ("fps", "max_fps"):
        v = getattr(s, key)
        if v is not None and not 0 < v <= 240:
            raise VideoXLError(f"model_args {key} must be in (0, 240] or none, got {v}")
    if s.chunk_prefill not in CHUNK_MODES:
        raise VideoXLError(f"model_args chunk_prefill must be one of {', '.join(CHUNK_MODES)}, got {s.chunk_prefill!r}")
    if s.bilevel_budget is not None and s.chunk_prefill == "none":
        raise VideoXLError("model_args bilevel_budget needs chunk_prefill=streaming or mask (its blocks stay dense)")
    if s.vision_chunk < 4 or s.vision_chunk % 4:
        raise VideoXLError(f"model_args vision_chunk must be a multiple of 4 frames, got {s.vision_chunk}")
    if s.kv_cache_gb < 0:
        raise VideoXLError(f"model_args kv_cache_gb must be >= 0, got {s.kv_cache_gb}")
    from videoxl.language.kv_fp8 import parse_kv_dtype
    from videoxl.language.quant import parse_quantize

    for parse, value in ((parse_quantize, s.quantize), (parse_kv_dtype, s.kv_dtype)):
        try:
            parse(value)
        except VideoXLError as e:
            raise VideoXLError(f"model_args {e}") from None
