"""Command line: `videoxl chat`, `videoxl inspect`, `videoxl make-tiny` (and `serve`, `batch`, `live` in their own
modules).

Every user error ends in one line on stderr and exit code 2 (3 for memory); the answer streams to stdout as it
is generated. Every setting and the video's header are checked before the (slow) model load.
"""
from __future__ import annotations

import argparse
import os
import sys

from videoxl.cli.options import (HelpFormatter, add_chunk_args, add_generation_args, add_quantize_arg, add_sampling_args,
                                 add_sparse_args, check_before_load)
from videoxl.cli.console import AnswerTimer, Loading, err, json_line, questions, report, show_warnings_as_lines
from videoxl.errors import VideoXLError, VideoXLMemoryError
from videoxl.inputs import check_video, fit_history, text_limit

DEFAULT_QUESTION = "Describe this video."


def build_parser() -> argparse.ArgumentParser:
    from videoxl import __version__

    parser = argparse.ArgumentParser(prog="videoxl", description="Ask questions about videos with Video-XL-2.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"videoxl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer a question about a video", formatter_class=HelpFormatter)
    chat.add_argument("video", nargs="?", help="video file, image, or folder of images")
    chat.add_argument("question", nargs="?", default=None,
                      help="the question; without one, questions are read one per line (as with -i)")
    chat.add_argument("-i", "--interactive", action="store_true",
                      help="after the question (if any), read more questions on the same video, one per line, "
                           "until end of input or 'exit'; the video is decoded and prefilled once")
    chat.add_argument("--model", help="checkpoint folder (config.json, safetensors, tokenizer); needed unless "
                                      "--demo (default: none)")
    chat.add_argument("--demo", action="store_true",
                      help="use the tiny model trained on the synthetic 'shapes' task, shipped in the package "
                           "(no VIDEO: it draws a task video and asks its seven questions)")
    chat.add_argument("--device", default="auto", help="cuda, cuda:1, cpu; auto = cuda if available, else cpu")
    chat.add_argument("--dtype", default="auto",
                      help="bfloat16, float16, float32; auto = bfloat16 on a GPU, float32 on a CPU")
    chat.add_argument("--json", action="store_true",
                      help="print one JSON object per answer ({question, answer, stats}) instead of the text")
    chat.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_quantize_arg(chat)
    add_sampling_args(chat)
    add_generation_args(chat)
    add_chunk_args(chat)
    add_sparse_args(chat)

    inspect = sub.add_parser("inspect", help="show what a checkpoint folder holds and whether it loads")
    inspect.add_argument("model")

    from videoxl.cli.serve import add_serve_parser  # argparse only: the server stack is imported when it starts
    add_serve_parser(sub, HelpFormatter)
    from videoxl.cli.batch import add_batch_parser
    add_batch_parser(sub, HelpFormatter)
    from videoxl.cli.live import add_live_parser
    add_live_parser(sub, HelpFormatter)

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the released format",
                          formatter_class=HelpFormatter)
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    return parser


def progress_stages(args) -> set[str]:
    if args.no_progress or args.json or not sys.stderr.isatty():  # off a terminal, bars would fill the logs
        return set()
    # On a terminal the streamed answer is the decoding progress; a bar would write over it.
    return {"vision", "prefill"} if sys.stdout.isatty() else {"vision", "prefill", "decode"}


def cmd_chat(args) -> int:
    if args.demo:  # the shipped tiny model trained on the "shapes" task (videoxl/demo/quiz.py)
        from videoxl.demo import demo_model_path
        from videoxl.demo.quiz import NOTICE
        from videoxl.demo.shapes import QUESTIONS

        model_dir, video = args.model or demo_model_path(), args.video
        if video and not os.path.exists(video) and args.question is None:
            if looks_like_a_path(video):  # `chat --demo typo.mp4` is a missing file, not a question
                raise VideoXLError(f"video not found: {video}")
            video, args.question = None, video  # `videoxl chat --demo "question"`
        print(NOTICE, file=sys.stderr)
        if video is None:  # draw a task video into the cache folder and ask about it
            from videoxl.demo.quiz import quiz

            model, tokenizer = load(args, model_dir, None if args.device == "auto" else args.device)
            quiz(model, tokenizer, seed=args.seed, questions=[args.question] if args.question else None)
            return 0
        if args.question is None and not (args.interactive or not sys.stdin.isatty()):
            args.question = QUESTIONS["needle"]  # nothing asked, nothing piped: the question the model knows
    else:
        if not args.model:
            raise VideoXLError("give --model DIR (a Video-XL-2 checkpoint folder), or --demo")
        if not args.video:
            raise VideoXLError("give a VIDEO to ask about")
        model_dir, video = args.model, args.video
    if isinstance(video, str) and not os.path.exists(video):
        raise VideoXLError(f"video not found: {video}")  # before the (slow) model load
    check_video(video)  # a FIFO or device, a NUL in the name: refused before the load too
    settings = check_before_load(args, video)
    from videoxl.devices import parse_device
    from videoxl.video.prefetch import Prefetch

    device = parse_device(None if args.device == "auto" else args.device)
    prefetch = Prefetch(video, (args.max_num_frames, args.sample_fps, args.max_sample_fps), device)
    model, tokenizer = load(args, model_dir, device)  # the first question's frames are decoded meanwhile
    model.prefetched = prefetch
    if model.config.random_weights and not args.demo:
        err(f"note: {model_dir} holds RANDOM weights (made by `videoxl make-tiny`): the answers are noise")
    if args.offload and model.device.type != "cuda":
        err("note: --offload has no effect on a CPU (the KVs are in CPU memory already)")
    interactive = args.interactive or args.question is None
    history = []
    for question in questions(args.question) if interactive else [args.question]:
        history, dropped = fit_history(model.config, tokenizer, question, history)
        if dropped:
            err(f"note: question + chat history would pass the {text_limit(model.config)}-token cap: dropped the "
                f"oldest {dropped} turn(s) of the history")
        timer = AnswerTimer(None if args.json else write)
        answer, history = model.chat(video, tokenizer, question, chat_history=history, return_history=True,
                                     max_num_frames=args.max_num_frames, sample_fps=args.sample_fps,
                                     max_sample_fps=args.max_sample_fps, settings=settings,
                                     show_progress=progress_stages(args), on_text=timer)
        stats = timer.finish(model.last_stats)
        write(json_line(question, answer, stats) + "\n" if args.json else "\n")
        err(report(stats, model.device.type))
    return 0


def load(args, model_dir: str, device):
    """`videoxl.load` with chat's dtype and precision options, the load shown on the terminal."""
    import videoxl

    with Loading(model_dir):
        return videoxl.load(model_dir, device=device, dtype=None if args.dtype == "auto" else args.dtype,
                            quantize=args.quantize, vision_dtype=args.vision_dtype, kv_dtype=args.kv_dtype)


VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".flv", ".wmv", ".ts", ".mpg", ".mpeg"}


def looks_like_a_path(text: str) -> bool:
    """A name with a video or image file's extension, or with a folder in it: meant as a file."""
    from videoxl.video.sources import IMAGE_EXTENSIONS

    ext = os.path.splitext(text)[1].lower()
    return os.sep in text or (ext in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS and " " not in text)


def write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_inspect(args) -> int:
    from videoxl.checkpoint.loader import inspect_checkpoint

    ok, text = inspect_checkpoint(args.model)
    print(text)
    return 0 if ok else 1


def cmd_make_tiny(args) -> int:
    from videoxl.checkpoint.tiny import make_tiny

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise VideoXLError(f"{args.out} exists and is not a folder")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise VideoXLError(f"{args.out} is not empty ({len(os.listdir(args.out))} entries), its files would be "
                           "overwritten: pick a new or empty folder, or add --force")
    make_tiny(args.out, seed=args.seed)
    print(f"wrote a tiny random-weight Video-XL-2 checkpoint to {args.out}")
    return 0


def cmd_serve(args) -> int:
    from videoxl.cli.serve import serve

    return serve(args)


def cmd_batch(args) -> int:
    from videoxl.cli.batch import cmd_batch as run_batch

    return run_batch(args)


def cmd_live(args) -> int:
    from videoxl.cli.live import cmd_live as run_live

    return run_live(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"chat": cmd_chat, "inspect": cmd_inspect, "make-tiny": cmd_make_tiny,
               "serve": cmd_serve, "batch": cmd_batch, "live": cmd_live}[args.command]
    show_warnings_as_lines()
    try:
        return handler(args)
    except VideoXLMemoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
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
