"""Checkpoint folder -> model. The one place where checkpoint tensor names map onto our modules.

A released Video-XL-2 folder holds `config.json`, `model-0000X-of-0000Y.safetensors` + `model.safetensors.index.json`
(or one `model.safetensors`) and the Qwen tokenizer files. Names follow the reference's `LlavaQwenForCausalLM`.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from videoxl.devices import on_device, parse_device, parse_dtype
from videoxl.checkpoint.read import Entry, header, read_all
from videoxl.config import VideoXLConfig, config_path
from videoxl.errors import VideoXLError

_init_lock = threading.Lock()  # one patched torch.nn.init at a time

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
IGNORED = "ignored"  # tensors present in the release but not used at inference


def map_name(name: str, cfg: VideoXLConfig) -> str | None:
    """Checkpoint name -> our parameter name, `IGNORED`, or None for a name we do not know."""
    if name.startswith(VISION_PREFIX):
        rest = name[len(VISION_PREFIX):]
        m = re.match(r"encoder\.layers\.(\d+)\.", rest)
        if m and int(m.group(1)) >= cfg.vision.layers_run:
            return IGNORED  # the deleted last layer, when the folder was saved before the deletion
        if rest.startswith(("post_layernorm.", "head.")) or rest.endswith("position_ids"):
            return IGNORED  # never run by the reference (features are read before them)
        return "vision.tower." + rest
    if name.startswith("model.text_mlp."):
        return IGNORED  # trained alongside, unused when answering
    for ckpt, ours in (("model.sae.", "vision.dts."), ("model.mm_projector.", "vision.projector."),
                       ("lm_head.", "decoder.lm_head."), ("model.", "decoder.")):
        if name.startswith(ckpt):
            ours_name = ours + name[len(ckpt):]
            if ckpt == "model." and not re.match(r"model\.(embed_tokens|layers|norm)\.", name):
                return None
            return ours_name
    return None


def our_to_checkpoint(ours: str) -> str:
    for ckpt, mine in (("model.sae.", "vision.dts."), ("model.mm_projector.", "vision.projector."),
                       (VISION_PREFIX, "vision.tower."), ("lm_head.", "decoder.lm_head."), ("model.", "decoder.")):
        if ours.startswith(mine):
            return ckpt + ours[len(mine):]
    raise KeyError(ours)


def weight_files(model_dir: str) -> dict[str, list[str]]:
    """safetensors file -> tensor names in it (from the index when sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VideoXLError(f"unreadable model.safetensors.index.json in {model_dir}: {e}") from None
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(model_dir, shard), []).append(name)
        for shard in files:
            if not os.path.exists(shard):
                raise VideoXLError(f"checkpoint shard listed in the index is missing: {shard}")
        return files
    if os.path.exists(single):
        return {single: None}
    raise VideoXLError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


@dataclass
class CheckpointReport:
    """What a folder holds against what the model needs: the basis of both `load` and `videoxl inspect`."""

    found: dict[str, Entry] = field(default_factory=dict)  # ours -> where its bytes are (file, name, shape)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    groups: Counter = field(default_factory=Counter)  # component -> parameter count

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problem(self) -> str:
        def few(names):
            return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {few(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {few(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} with wrong shape: {few(self.mismatched)}")
        return "checkpoint does not match the model: " + "; ".join(parts)


def scan(model_dir: str, cfg: VideoXLConfig, expected: dict[str, torch.Size]) -> CheckpointReport:
    report = CheckpointReport()
    for path, names in weight_files(model_dir).items():
        entries = header(path)
        for name in names if names is not None else entries:
            if name not in entries:
                raise VideoXLError(f"checkpoint index names {name}, which {path} does not hold")
            shape = entries[name].shape
            ours = map_name(name, cfg)
            if ours == IGNORED:
                report.ignored.append(name)
            elif ours is None or ours not in expected:
                report.unexpected.append(name)
            elif shape != tuple(expected[ours]):
                report.mismatched.append(f"{name} {list(shape)} != {list(expected[ours])}")
            else:
                report.found[ours] = entries[name]
                report.groups[ours.split(".")[1] if ours.startswith("vision.") else "decoder"] += \
                    torch.Size(shape).numel()
    tied = cfg.text.tie_word_embeddings and "decoder.lm_head.weight" not in report.found
    report.missing = [our_to_checkpoint(n) for n in expected
                      if n not in report.found and not (tied and n == "decoder.lm_head.weight")]
    return report


def read_config(model_dir: str) -> VideoXLConfig:
    if not os.path.isdir(model_dir):
        raise VideoXLError(f"checkpoint folder not found: {model_dir}")
    return VideoXLConfig.from_file(config_path(model_dir))


def empty_model(cfg: VideoXLConfig):
    """The model with its parameters on the meta device (shapes only). The layers' own initialisers are
    skipped: on meta tensors they run through torch's Python reference ops, whose first use imports
    torch._dynamo (seconds of a fresh process's start, measured 5.3 s against 0.5 s on a loaded 2-core CPU),
    and they would fill nothing anyway. Real tensors are initialised as always, whatever thread makes them."""
    from videoxl.model import VideoXL

    init = torch.nn.init
    saved = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}

    def skip_on_meta(real):
        return lambda t, *a, **k: t if t.is_meta else real(t, *a, **k)

    with _init_lock:
        for name, real in saved.items():
            setattr(init, name, skip_on_meta(real))
        try:
            with torch.device("meta"):
                return VideoXL(cfg)
        finally:
            for name, real in saved.items():
                setattr(init, name, real)


LOAD_THREADS = 8  # reading threads (each with its own pinned buffers and stream): tensors are shared out, not files


def load_model(model_dir: str, device="cpu", dtype=torch.float32, cfg: VideoXLConfig | None = None,
               quantize: str | None = None):
    """`quantize` (a scheme of `language/quant.py`, checked by the caller): each decoder linear weight is
    quantized as it is read, so the full-precision decoder is never resident at once."""
    from videoxl.language import quant

    cfg = cfg or read_config(model_dir)
    model = empty_model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    report = scan(model_dir, cfg, expected)
    if not report.ok:
        raise VideoXLError(report.problem())
    entries = list(report.found.items())  # the headers scan read: no file is opened twice
    state, quantized, lock = {}, {}, threading.Lock()
    device = torch.device(device)

    def keep(ours: str, tensor: torch.Tensor, reader) -> None:
        if tensor.dtype != dtype or (quantize and quant.is_target(ours)):
            reader.wait()  # the bytes have landed before they are converted and the raw copy is freed
            tensor = tensor.to(dtype)
        if quantize and quant.is_target(ours):
            tensor = quant.QuantLinear.quantize(tensor, None, quantize)
            with lock:
                quantized[ours[:-len(".weight")]] = tensor
        else:
            with lock:
                state[ours] = tensor

    threads = max(1, min(LOAD_THREADS, os.cpu_count() or 1))
    read_all(entries, device, threads, keep)  # every copy has landed when it returns
    if "decoder.lm_head.weight" not in state:  # tie_word_embeddings
        state["decoder.lm_head.weight"] = state["decoder.embed_tokens.weight"]
    quant.install(model, quantized, state)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def load_tokenizer(model_dir: str):
    """The folder's tokenizer: `tokenizer.json` through the `tokenizers` library (checkpoint/tokenizer.py: no
    transformers import, seconds of a fresh process), else transformers' AutoTokenizer."""
    from videoxl.checkpoint.tokenizer import FolderTokenizer, load_transformers_tokenizer

    check_tokenizer_files(model_dir)
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return FolderTokenizer(model_dir)
    return load_transformers_tokenizer(model_dir)


def check_tokenizer_files(model_dir: str) -> None:
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.json")):
        raise VideoXLError(f"no tokenizer files (tokenizer.json or vocab.json) in {model_dir}")


def load(model_dir: str, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         kv_cache_gb: float = 0, kv_cache_dir: str | None = None, quantize: str | None = None,
         vision_dtype: str | None = None, kv_dtype: str | None = None):
    """`videoxl.load(path)` -> (model, tokenizer). Defaults: CUDA + bfloat16 when there is a GPU, else CPU + fp32.
    Videos' prefix KVs are kept in memory up to `kv_cache_gb` (0: the latest video only) and, with
    `kv_cache_dir`, on disk, where a later process finds them (see video_kv.py). `quantize`: None, "int8",
    "int4" or "fp8", the decoder layers' weights (see language/quant.py). `vision_dtype`: None (the model's
    dtype) or "fp8", the vision side's linear layers (see vision/precision.py). `kv_dtype`: None (the model's
    dtype) or "fp8", how every KV cache stores keys and values (see language/kv_fp8.py)."""
    from videoxl.cache.store import VideoKVCache
    from videoxl.language import kv_fp8, quant
    from videoxl.vision.precision import parse_vision_dtype, quantize_vision

    if not isinstance(model_dir, (str, os.PathLike)):
        raise VideoXLError(f"model path must be a folder path (str), got {type(model_dir).__name__}")
    model_dir = os.fspath(model_dir)
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    scheme = quant.parse_quantize(quantize)
    if scheme:
        quant.check_device(scheme, device, dtype)
    vision_scheme = parse_vision_dtype(vision_dtype)
    kv_scheme = kv_fp8.parse_kv_dtype(kv_dtype)
    if kv_scheme:
        kv_fp8.check_kv_device(device)
    if vision_scheme:
        quant.check_device(vision_scheme, device, dtype, what="vision_dtype")
    cfg = read_config(model_dir)  # first: its errors are the clearest
    kv_cache = VideoKVCache(VideoKVCache.parse_gb(kv_cache_gb), kv_cache_dir)
    check_tokenizer_files(model_dir)  # before the weights are read, as its error is clearer than theirs
    with ThreadPoolExecutor(1, thread_name_prefix="videoxl-tokenizer") as pool:
        tokenizer = pool.submit(load_tokenizer, model_dir)  # beside the weights
        model = load_model(model_dir, device, dtype, cfg, scheme)
        tokenizer = tokenizer.result()
    if vision_scheme:
        with on_device(device):
            quantize_vision(model.vision, vision_scheme)
    model.kv_cache = kv_cache
    model.decoder.kv_dtype = kv_scheme  # every store the model makes (decoder.new_cache) stores KVs so
    return model, tokenizer


def inspect_checkpoint(model_dir: str) -> tuple[bool, str]:
    """(matches, human-readable summary) of a checkpoint folder, without loading any tensor data."""
    cfg = read_config(model_dir)
    model = empty_model(cfg)
    report = scan(model_dir, cfg, {k: v.shape for k, v in model.state_dict().items()})
    t, v = cfg.text, cfg.vision
    lines = [
        f"checkpoint: {model_dir}",
        f"decoder: Qwen2, {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads "
        f"({t.num_key_value_heads} KV), vocab {t.vocab_size}, rope_theta {t.rope_theta:g}",
        f"vision: SigLIP, {v.num_hidden_layers} layers ({v.layers_run} run), width {v.hidden_size}, "
        f"{v.image_size}px / patch {v.patch_size}; DTS width {cfg.mm_hidden_size}; "
        f"{cfg.tokens_per_group} tokens per 4 frames",
        "parameters: " + ", ".join(f"{k} {n / 1e6:.2f}M" for k, n in sorted(report.groups.items()))
        + f" (total {sum(report.groups.values()) / 1e6:.2f}M)",
        f"tensors: {len(report.found)} used, {len(report.ignored)} present but unused at inference",
        "status: OK, loads" if report.ok else "status: " + report.problem(),
        *(["weights: RANDOM (made by `videoxl make-tiny`): it runs, its answers are noise"]
          if cfg.random_weights else []),
    ]
    tok = any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.json"))
    lines.append("tokenizer: found" if tok else "tokenizer: MISSING (tokenizer.json or vocab.json)")
    return report.ok and tok, "\n".join(lines)
