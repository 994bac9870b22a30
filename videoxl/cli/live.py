"""`videoxl live SOURCE`: follow a growing file or a stream and answer questions typed at any moment;
`videoxl live --demo`: the shipped demo model on a synthetic shapes stream played faster than real time.

Each answer is followed by the stretch of video it covers (the frames in whole groups of 4 when it was asked).
"""
from __future__ import annotations

import argparse
import os

from videoxl.cli.console import AnswerTimer, Loading, err, questions, report
from videoxl.cli.options import (add_chunk_args, add_generation_args, add_kv_dtype_arg, add_sparse_args,
                                 settings_from_args)
from videoxl.errors import VideoXLError
from videoxl.live.source import wait_for


def add_live_parser(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("live", help="ask about a video while it is being recorded (a growing file or a stream)",
                       formatter_class=formatter_class)
    p.add_argument("source", nargs="?", help="a file still being written (MPEG-TS, MKV, fragmented MP4) or a "
                                             "stream URL PyAV can open (rtsp://, http://, udp://, ...)")
    p.add_argument("--model", help="checkpoint folder; needed unless --demo")
    p.add_argument("--demo", action="store_true", help="the shipped demo model on a synthetic shapes stream")
    p.add_argument("--seconds", type=int, default=240, help="--demo: length of the shapes stream")
    p.add_argument("--speed", type=float, default=10.0, help="--demo: times real time (0: as fast as it goes)")
    p.add_argument("--demo-seed", type=int, default=None, help="--demo: which shapes video (default: random)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu; auto = cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="bfloat16, float16, float32; auto = bf16 on a GPU")
    add_kv_dtype_arg(p)
    p.add_argument("--sample-fps", type=float, default=1.0, help="frames per second taken from the source")
    p.add_argument("--max-frames", type=int, default=None, help="stop taking frames after this many (default: "
                                                                 "no limit but memory)")
    p.add_argument("--wait-frames", type=int, default=0,
                   help="before taking questions, wait until this many frames are in (for scripts)")
    add_generation_args(p)
    add_chunk_args(p)
    add_sparse_args(p)
    return p


def cmd_live(args) -> int:
    import random

    import videoxl

    if args.demo == bool(args.source):
        raise VideoXLError("give a SOURCE to follow, or --demo (not both)")
    if args.source and "://" not in args.source and not os.path.exists(args.source):
        raise VideoXLError(f"live source not found: {args.source}")
    settings = settings_from_args(args)  # the options and checks `chat` and `serve` share
    model_dir = args.model
    if args.demo:
        from videoxl.demo import demo_model_path
        from videoxl.demo.quiz import NOTICE

        model_dir = model_dir or demo_model_path()
        err(NOTICE)
    elif not model_dir:
        raise VideoXLError("give --model DIR (a Video-XL-2 checkpoint folder), or --demo")
    with Loading(model_dir):
        model, tok = videoxl.load(model_dir, device=None if args.device == "auto" else args.device,
                                  dtype=None if args.dtype == "auto" else args.dtype, kv_dtype=args.kv_dtype)
    session = model.open_live(tok, sample_fps=args.sample_fps, max_frames=args.max_frames, settings=settings)
    video, feed = None, None
    try:
        if args.demo:
            from videoxl.demo import shapes
            from videoxl.live.demo import DemoFeed

            seed = random.randrange(10**6) if args.demo_seed is None else args.demo_seed
            video = shapes.make_video(seed, args.seconds)
            feed = DemoFeed(session, video, args.speed)
            feed.start()
            err(f"playing shapes video seed {seed} ({args.seconds} s) at {args.speed:g}x; ask e.g. "
                f"{shapes.QUESTIONS['last']!r}")
        else:
            session.append_source(args.source)
            err(f"following {args.source} at {args.sample_fps:g} fps")
        wait_for(lambda: session.stats["frames"] >= args.wait_frames or stopped(session, feed), float("inf"))
        for question in questions(None):
            answer_one(session, question, args, video, model.device.type)
    finally:
        session.close()
        if feed is not None:
            feed.join()  # it stops at its next frame: the session is closed
    return 0


def stopped(session, feed) -> bool:
    """The frames stopped coming: the demo played to its end, or the source reader ended (an error, a stream's
    end)."""
    if feed is not None:
        return feed.done.is_set()
    return all(r.ended for r in session.sources)


def answer_one(session, question: str, args, video, device_type: str) -> None:
    import sys

    timer = AnswerTimer(lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    try:
        for piece in session.stream_ask(question):
            timer(piece)
    except VideoXLError as e:  # nothing to ask about yet, a source error...: say so and keep listening
        err(f"error: {e}")
        return
    print()
    stats = timer.finish(session.last_stats)
    start, end = stats["covers_s"]
    line = f"[covers {start:g}-{end:g} s: {stats['frames']} frames in {stats['groups']} groups"
    if stats.get("not_covered"):
        line += f"; {stats['frames_pending']} newer frame(s) not in yet (a group of 4 is read whole)"
    err(line + "]")
    if video is not None:
        from videoxl.demo import shapes
        from videoxl.live.demo import truth_at

        kind = {q: k for k, q in video.questions.items()}.get(question)
        if kind is not None:
            expected = truth_at(video, stats["frames"]).get(kind)
            answer = session.history[-1][1]
            verdict = "not shown yet" if expected is None else (
                "ok" if shapes.is_correct(answer, expected) else "WRONG")
            err(f"[expected over what was shown: {expected or '-'}: {verdict}]")
    err(report(stats, device_type))
    for source in stats.get("sources", []):
        if source["error"]:
            err(f"[source {source['source']}: {source['error']}]")
