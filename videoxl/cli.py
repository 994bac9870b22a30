"""Command line: `videoxl chat`, `videoxl inspect`, `videoxl make-tiny`.

Every user error ends in one line on stderr and exit code 2; the answer streams to stdout as it is generated.
"""
from __future__ import annotations

import argparse
import os
import sys

from .chunking import PrefillConfig
from .decoding.sparse_config import SparseConfig
from .errors import VideoXLError

DEFAULT_QUESTION = "Describe this video."


def optional_float(text: str):
    return None if text.lower() in ("none", "uniform") else float(text)


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
    p.add_argument("--max-num-frames", type=int, default=150, help="most frames to sample (default 150)")
    p.add_argument("--sample-fps", type=optional_float, default=1.0,
                   help="frames per second to sample; 'none' = uniform over the video (default 1)")
    p.add_argument("--max-sample-fps", type=optional_float, default=None,
                   help="raise the rate up to this when the video is short (default: off)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def generation_config(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videoxl", description="Ask questions about videos with Video-XL-2.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer a question about a video")
    chat.add_argument("video", nargs="?", help="video file, image, or folder of images")
    chat.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    chat.add_argument("--model", help="checkpoint folder (config.json, safetensors, tokenizer)")
    chat.add_argument("--demo", action="store_true",
                      help="use the tiny model trained on the synthetic 'shapes' task (no VIDEO: it draws a "
                           "task video and asks its four questions)")
    chat.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    chat.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on GPU)")
    chat.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_sampling_args(chat)
    add_generation_args(chat)
    chunk = chat.add_argument_group("chunk-based prefill (the model card's prefill_config)")
    chunk.add_argument("--chunk-prefill", choices=["streaming", "mask"], default=None,
                       help="enable chunk-based prefill in this mode (default: dense prefill)")
    chunk.add_argument("--chunk-size", type=int, default=4,
                       help="attention window, in groups of 4 frames (default 4)")
    chunk.add_argument("--step-size", type=int, default=1,
                       help="groups of 4 frames per block; must divide --chunk-size (default 1)")
    chunk.add_argument("--offload", action="store_true", help="keep the KVs in CPU memory")
    chunk.add_argument("--vision-chunk", type=int, default=24,
                       help="frames per vision-tower batch, a multiple of 4 (default 24)")

    sparse = chat.add_argument_group("bi-level KV decoding (the model card's enable_sparse; needs --chunk-prefill)")
    sparse.add_argument("--sparse", action="store_true",
                        help="keep only the blocks the question needs dense, the rest pooled (default: off)")
    sparse.add_argument("--sparse-budget", type=budget_value, default=0.25,
                        help="share of blocks kept dense (0.25) or a whole number of blocks (8) (default 0.25)")
    sparse.add_argument("--sparse-compression", type=int, default=4,
                        help="visual KVs of a pooled block averaged over this many tokens (default 4)")
    sparse.add_argument("--dense-times", type=time_spans, default=None,
                        help="seconds that must stay dense, e.g. '10-25,300-320' (default: none)")

    inspect = sub.add_parser("inspect", help="show what a checkpoint folder holds and whether it loads")
    inspect.add_argument("model")

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the released format")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def progress_stages(args) -> set[str]:
    if args.no_progress:
        return set()
    # On a terminal the streamed answer is the decoding progress; a bar would write over it.
    return {"vision", "prefill"} if sys.stdout.isatty() else {"vision", "prefill", "decode"}


def cmd_chat(args) -> int:
    import videoxl

    if args.demo:  # the shipped tiny model trained on the "shapes" task (videoxl/demo.py)
        from .demo import NOTICE, demo_model_path

        model_dir, video = args.model or demo_model_path(), args.video
        print(NOTICE, file=sys.stderr)
        if args.question == DEFAULT_QUESTION:
            from .shapes import QUESTIONS

            args.question = QUESTIONS["needle"]  # the model knows nothing else
        if video is None:
            from .demo import quiz

            model, tokenizer = videoxl.load(model_dir, device=args.device, dtype=args.dtype)
            quiz(model, tokenizer, seed=args.seed)
            return 0
    else:
        if not args.model:
            raise VideoXLError("give --model DIR (a Video-XL-2 checkpoint folder), or --demo")
        if not args.video:
            raise VideoXLError("give a VIDEO to ask about")
        model_dir, video = args.model, args.video
    if isinstance(video, str) and not os.path.exists(video):
        raise VideoXLError(f"video not found: {video}")  # before the (slow) model load
    prefill_config = None
    if args.chunk_prefill:
        prefill_config = {"chunk_prefill_mode": args.chunk_prefill, "chunk_size": args.chunk_size,
                          "step_size": args.step_size, "offload": args.offload,
                          "chunk_size_for_vision_tower": args.vision_chunk}
        PrefillConfig.from_dict(prefill_config)  # settings errors before the (slow) model load
    sparse_config = None
    if args.sparse:
        if not args.chunk_prefill:
            raise VideoXLError("--sparse (bi-level decoding) needs --chunk-prefill streaming|mask: its blocks are "
                               "what is kept dense")
        sparse_config = {"budget": args.sparse_budget, "compression": args.sparse_compression,
                         "dense_times": args.dense_times}
        SparseConfig.from_dict(dict(sparse_config))
    model, tokenizer = videoxl.load(model_dir, device=args.device, dtype=args.dtype)
    if prefill_config:
        model.config.enable_chunk_prefill = True
        model.config.prefill_config = prefill_config
    if sparse_config:
        model.config.enable_sparse, model.config.sparse_config = True, sparse_config

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    model.chat(video, tokenizer, args.question, max_num_frames=args.max_num_frames, sample_fps=args.sample_fps,
               max_sample_fps=args.max_sample_fps, generation_config=generation_config(args),
               show_progress=progress_stages(args), on_text=write)
    sys.stdout.write("\n")
    print(report(model.last_stats), file=sys.stderr)
    return 0


def report(s: dict) -> str:
    """One line on what the last question cost: frames, blocks, attention share, times, peak GPU memory."""
    parts = [f"{s['frames']} frames", f"{s['groups']} groups of 4", f"{s['prompt_tokens']} prompt tokens",
             f"prefill {s['prefill']}"]
    if "blocks" in s:
        parts.append(f"{s['blocks']} blocks, {100 * s['attended_share']:.1f}% of attention pairs computed"
                     + (", KVs offloaded" if s.get("offload") else ""))
    for key, name in (("vision_s", "decode + vision"), ("prefill_s", "prefill")):
        if key in s:
            parts.append(f"{name} {s[key]:.2f}s")
    if "peak_gpu_gb" in s:
        parts.append(f"peak GPU {s['peak_gpu_gb']:.1f} GiB")
    if "dense_blocks" in s:
        spans = ", ".join(f"{a:g}-{b:g}s" for a, b in s["dense_blocks"])
        parts.append(f"bi-level: {len(s['dense_blocks'])} of {s['blocks']} blocks dense ({spans}), "
                     f"{100 * s['kept_share']:.0f}% of the video's KVs kept")
    if s.get("ttft_s") is not None:
        parts.append(f"first token {s['ttft_s']:.2f}s")
    if s.get("decode_tokens_per_s"):
        parts.append(f"{s['generated_tokens']} tokens at {s['decode_tokens_per_s']:.1f} tokens/s "
                     f"({s['decode_path']} decode)")
    return "[" + ", ".join(parts) + "]"


def cmd_inspect(args) -> int:
    from .loader import inspect_checkpoint

    ok, text = inspect_checkpoint(args.model)
    print(text)
    return 0 if ok else 1


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny

    make_tiny(args.out, seed=args.seed)
    print(f"wrote a tiny random-weight Video-XL-2 checkpoint to {args.out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"chat": cmd_chat, "inspect": cmd_inspect, "make-tiny": cmd_make_tiny}[args.command]
    try:
        return handler(args)
    except VideoXLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "out of memory" not in str(e):
            raise
        print("error: out of memory; try fewer frames (--max-num-frames) or chunked prefill", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
