"""The command line's shared options (sampling, generation, chunk prefill, bi-level decoding) and their checks,
used by `videoxl chat`, `serve` and `batch`: each builds one `videoxl.settings.Settings` here, checked before the
(slow) model load, and passes it down (nothing is written into the checkpoint's config)."""
from __future__ import annotations

import argparse
import dataclasses
import os

from videoxl.prefill.plan import PrefillConfig
from videoxl.decoding.sparse_config import SparseConfig
from videoxl.errors import VideoXLError
from videoxl.settings import Settings

CHUNK_DEFAULTS = PrefillConfig()  # what --chunk-size etc. are with --chunk-prefill when not given
SPARSE_DEFAULTS = SparseConfig()  # what --sparse-budget etc. are with --sparse when not given


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the text already names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        default = action.default
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
        return f"{text} (default: {shown})"


def optional_float(text: str):
    return None if text.lower() in ("none", "uniform") else float(text)


def optional_int(text: str):
    return None if text.lower() == "none" else int(text)


def budget_value(text: str):
    """'0.25' -> a share, '8' -> a number of blocks (validated by SparseConfig)."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a share or a number of blocks: {text!r}") from None


def time_spans(text: str) -> list[list[float]]:
    try:
        return [[float(x) for x in part.split("-", 1)] for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START-END seconds, comma-separated: {text!r}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-frames", type=int, default=150, help="most frames to sample")
    p.add_argument("--sample-fps", type=optional_float, default=1.0,
                   help="frames per second to sample; 'none' = uniform over the video")
    p.add_argument("--max-sample-fps", type=optional_float, default=None,
                   help="raise the rate up to this when the video is short; 'none' = off")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["none", "int8", "int4", "fp8"], default="none",
                   help="the decoder layers' weights: int8 (per channel), int4 (groups of 128), fp8 (e4m3, GPUs "
                        "of compute capability >= 8.9); the embedding and output head stay in --dtype")
    p.add_argument("--vision-dtype", choices=["model", "fp8"], default="model",
                   help="the vision side's linear layers (SigLIP, projector): the model's dtype, or fp8 GEMMs "
                        "(compute capability >= 8.9)")
    add_kv_dtype_arg(p)


def add_kv_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=["model", "fp8"], default="model",
                   help="how the KV cache stores keys and values: the model's dtype, or fp8 (e4m3 with a scale per "
                        "token: half the bytes; on a GPU, compute capability >= 8.9)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty; 1 = off")
    p.add_argument("--seed", type=optional_int, default=None, help="sampling seed; 'none' = random")


def generation_config(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed}


def add_chunk_args(p: argparse.ArgumentParser) -> None:
    chunk = p.add_argument_group("chunk-based prefill (the model card's prefill_config)")
    chunk.add_argument("--chunk-prefill", choices=["streaming", "mask"], default=None,
                       help="enable chunk-based prefill in this mode; none = dense prefill")
    chunk.add_argument("--chunk-size", type=int, default=None,
                       help=f"attention window, in groups of 4 frames (default: {CHUNK_DEFAULTS.chunk_size})")
    chunk.add_argument("--step-size", type=int, default=None,
                       help=f"groups of 4 frames per block; must divide --chunk-size "
                            f"(default: {CHUNK_DEFAULTS.step_size})")
    chunk.add_argument("--offload", action="store_true", help="keep the KVs in CPU memory (helps on a GPU only)")
    chunk.add_argument("--vision-chunk", type=int, default=None,
                       help=f"frames per vision-tower batch, a multiple of 4 "
                            f"(default: {CHUNK_DEFAULTS.chunk_size_for_vision_tower})")


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    sparse = p.add_argument_group("bi-level KV decoding (the model card's enable_sparse; needs --chunk-prefill)")
    sparse.add_argument("--sparse", action="store_true",
                        help="keep only the blocks the question needs dense, the rest pooled (default: off)")
    sparse.add_argument("--sparse-budget", type=budget_value, default=None,
                        help=f"share of blocks kept dense (0.25) or a whole number of blocks (8) "
                             f"(default: {SPARSE_DEFAULTS.budget})")
    sparse.add_argument("--sparse-compression", type=int, default=None,
                        help=f"visual KVs of a pooled block averaged over this many tokens "
                             f"(default: {SPARSE_DEFAULTS.compression})")
    sparse.add_argument("--dense-times", type=time_spans, default=None,
                        help="seconds that must stay dense, e.g. '10-25,300-320' (default: none)")


def check_before_load(args, video) -> Settings:
    """Every setting, and the video file's header, checked before the (slow) model load; returns the
    question settings (prefill, bi-level decoding and, where the command has them, generation)."""
    from videoxl.video.sources import IMAGE_EXTENSIONS, check_sampling, open_video

    check_sampling(args.max_num_frames, args.sample_fps, args.max_sample_fps)
    settings = settings_from_args(args)
    if isinstance(video, str) and os.path.isfile(video) and \
            os.path.splitext(video)[1].lower() not in IMAGE_EXTENSIONS:
        open_video(video, args.max_num_frames, args.sample_fps, args.max_sample_fps)  # reads the header only
    return settings


def settings_from_args(args) -> Settings:
    """The chunk-prefill, bi-level and generation options as one validated `Settings`."""
    only_with("--chunk-prefill streaming|mask", args.chunk_prefill,
              {"--chunk-size": args.chunk_size, "--step-size": args.step_size, "--vision-chunk": args.vision_chunk,
               "--offload": args.offload or None})
    if args.sparse and not args.chunk_prefill:
        raise VideoXLError("--sparse (bi-level decoding) needs --chunk-prefill streaming|mask: its blocks are what is "
                           "kept dense")
    only_with("--sparse", args.sparse, {"--sparse-budget": args.sparse_budget,
                                        "--sparse-compression": args.sparse_compression,
                                        "--dense-times": args.dense_times})
    generation = generation_config(args) if hasattr(args, "max_new_tokens") else None
    if not args.chunk_prefill:
        return Settings.build(None, None, generation)
    d = CHUNK_DEFAULTS
    prefill = {"chunk_prefill_mode": args.chunk_prefill,
               "chunk_size": d.chunk_size if args.chunk_size is None else args.chunk_size,
               "step_size": d.step_size if args.step_size is None else args.step_size, "offload": args.offload,
               "chunk_size_for_vision_tower": d.chunk_size_for_vision_tower if args.vision_chunk is None
               else args.vision_chunk}
    sparse = None
    if args.sparse:
        sparse = {"budget": SPARSE_DEFAULTS.budget if args.sparse_budget is None else args.sparse_budget,
                  "compression": SPARSE_DEFAULTS.compression if args.sparse_compression is None
                  else args.sparse_compression, "dense_times": args.dense_times}
    return Settings.build(prefill, sparse, generation)


def card_dicts(settings: Settings) -> tuple[dict | None, dict | None]:
    """The settings as the model card's `prefill_config` / `sparse_config` dicts (plain data for workers in
    other processes; `Settings.build` reads them back)."""
    def as_dict(cfg):
        return None if cfg is None else {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}

    return as_dict(settings.prefill), as_dict(settings.sparse)


def only_with(needed: str, present, options: dict) -> None:
    """Options that only mean something with another one are an error without it, not silently ignored."""
    given = [flag for flag, value in options.items() if value is not None]
    if given and not present:
        many = len(given) > 1
        raise VideoXLError(f"{', '.join(given)} only appl{'y' if many else 'ies'} with {needed}: add it, or drop "
                           f"{'them' if many else 'it'}")


def parse_devices(text: str) -> list[str]:
    """`--devices`: 'auto' = every GPU, else the CPU; or a comma-separated list, each checked before any load."""
    import torch

    if text == "auto":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise VideoXLError("--devices is empty: name one or more devices, e.g. cuda:0,cuda:1, or auto")
    from videoxl.devices import parse_device

    for d in devices:
        parse_device(d)  # one line of error for an unknown or absent device, before anything loads
    return devices
