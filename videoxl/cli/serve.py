"""`videoxl serve`: its options (parsed without importing the server stack) and the start-up."""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from videoxl.cli.options import (add_chunk_args, add_quantize_arg, add_sparse_args, optional_float, parse_devices,
                                 settings_from_args)
from videoxl.errors import VideoXLError


def add_serve_parser(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (POST /v1/chat/completions with video_url)",
                       formatter_class=formatter_class)
    p.add_argument("--model", default=None, help="checkpoint folder (needed unless --demo; no default)")
    p.add_argument("--demo", action="store_true", help="serve the tiny demo model shipped in the package")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    p.add_argument("--devices", default=None,
                   help="one engine worker per device, comma-separated (default: every GPU, else cpu)")
    p.add_argument("--worker-threads", action="store_true",
                   help="every device's worker in the server's process (default: each device after the first in a "
                        "process of its own: two GPUs' threads in one process decode frames at half speed)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on GPU)")
    add_quantize_arg(p)
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond these get HTTP 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request, queueing included")
    cache = p.add_argument_group("video KV cache")
    cache.add_argument("--kv-cache-gb", type=float, default=8.0, help="per worker, in GPU/CPU memory (LRU)")
    cache.add_argument("--kv-cache-dir", default=None, help="also keep videos' KVs here, across restarts")
    media = p.add_argument_group("media (all off or capped by default)")
    media.add_argument("--allowed-local-media-path", default=None, help="file:// URLs only under this folder")
    media.add_argument("--allowed-media-domains", nargs="*", default=[], help="hosts http(s) URLs may name")
    media.add_argument("--max-media-mb", type=float, default=2048, help="largest video file")
    media.add_argument("--max-base64-mb", type=float, default=64, help="largest data: URL payload (encoded)")
    media.add_argument("--max-request-mb", type=float, default=512, help="largest request body")
    media.add_argument("--max-duration-s", type=float, default=4 * 3600, help="longest video")
    media.add_argument("--max-frames", type=int, default=2048, help="most frames a request may ask for")
    media.add_argument("--max-tokens", type=int, default=4096, help="most answer tokens a request may ask for")
    sampling = p.add_argument_group("defaults for requests that do not say")
    sampling.add_argument("--max-num-frames", type=int, default=150, help="most frames to sample")
    sampling.add_argument("--sample-fps", type=optional_float, default=1.0, help="frames per second; 'none' = uniform")
    sampling.add_argument("--max-sample-fps", type=optional_float, default=None, help="raise the rate up to this")
    sampling.add_argument("--default-max-tokens", type=int, default=256, help="answer tokens when max_tokens is unset")
    live = p.add_argument_group("live sessions (POST /v1/live/sessions; questions with video_url session://ID)")
    live.add_argument("--live-max-sessions", type=int, default=8, help="sessions open at once")
    live.add_argument("--live-max-frames", type=int, default=4 * 3600, help="sampled frames per session")
    live.add_argument("--live-max-gb", type=float, default=32.0, help="KV memory per session")
    live.add_argument("--live-idle-s", type=float, default=900.0, help="close a session idle this long")
    add_chunk_args(p)
    add_sparse_args(p)
    return p


def build(args):
    """Options -> (app, engine): models loaded, workers not started. Checks come before the slow loads."""
    import videoxl
    from videoxl.serving.app import Settings, create_app
    from videoxl.serving.engine import Engine
    from videoxl.serving.live import LiveLimits
    from videoxl.serving.media import MediaLimits
    from videoxl.serving.metrics import Metrics
    from videoxl.serving.remote import RemoteModel
    from videoxl.video.read import core_shares, usable_core_ids
    from videoxl.serving.protocol import ServerDefaults

    if args.demo == bool(args.model):
        raise VideoXLError("give --model DIR (a checkpoint folder) or --demo, one of them")
    if args.demo:
        from videoxl.demo import demo_model_path

        args.model = demo_model_path()
    if not os.path.isdir(args.model):
        raise VideoXLError(f"--model must be a checkpoint folder: {args.model}")
    if not 1 <= args.port <= 65535:
        raise VideoXLError(f"--port must be in 1..65535, got {args.port}")
    check_port_free(args.host, args.port)
    for name in ("max_media_mb", "max_base64_mb", "max_request_mb", "max_duration_s", "request_timeout",
                 "kv_cache_gb"):
        if not getattr(args, name) >= 0:
            raise VideoXLError(f"--{name.replace('_', '-')} must be a number >= 0")
    for name in ("live_max_gb", "live_idle_s"):
        if not getattr(args, name) > 0:
            raise VideoXLError(f"--{name.replace('_', '-')} must be a number > 0")
    for name in ("live_max_sessions", "live_max_frames", "max_queue", "max_frames", "max_tokens", "max_num_frames",
                 "default_max_tokens"):
        if getattr(args, name) < 1:
            raise VideoXLError(f"--{name.replace('_', '-')} must be at least 1")
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise VideoXLError(f"--allowed-local-media-path is not a folder: {args.allowed_local_media_path}")
    question_settings = settings_from_args(args)  # the same options and checks as `videoxl chat`
    devices = parse_devices(args.devices or "auto")

    load_kwargs = dict(model_dir=args.model, dtype=args.dtype, quantize=args.quantize, vision_dtype=args.vision_dtype,
                       kv_dtype=args.kv_dtype, kv_cache_gb=args.kv_cache_gb, kv_cache_dir=args.kv_cache_dir)
    here = devices if args.worker_threads else devices[:1]
    # each worker in a process of its own takes its slice of the cores, as `batch` does (threads would share
    # one torch pool and one affinity)
    shares = core_shares(usable_core_ids(), len(devices)) if len(here) < len(devices) else [None] * len(devices)
    remotes = [RemoteModel(dict(load_kwargs, device=d), shares[i])  # they load beside ours
               for i, d in enumerate(devices) if i >= len(here)]
    try:
        with ThreadPoolExecutor(len(here), thread_name_prefix="videoxl-load") as pool:
            replicas = list(pool.map(lambda d: videoxl.load(device=d, **load_kwargs), here))
        for remote in remotes:
            remote.wait_ready()
    except BaseException:
        for remote in remotes:
            remote.close(timeout=0)
        raise
    replicas += [(remote, replicas[0][1]) for remote in remotes]  # its tokenizer is the child's; this one is unused
    mb = 2**20
    limits = MediaLimits(args.allowed_local_media_path, tuple(args.allowed_media_domains),
                         int(args.max_media_mb * mb), int(args.max_base64_mb * mb), int(args.max_request_mb * mb),
                         args.max_duration_s)
    defaults = ServerDefaults(args.max_num_frames, args.sample_fps, args.max_sample_fps, args.max_frames,
                              min(args.default_max_tokens, args.max_tokens), args.max_tokens)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    registry = os.path.join(args.kv_cache_dir, "uuids.json") if args.kv_cache_dir else None
    tmp_dir = tempfile.mkdtemp(prefix="videoxl-media-")
    live = LiveLimits(args.live_max_sessions, args.live_max_frames, int(args.live_max_gb * 2**30),
                      idle_s=args.live_idle_s)
    settings = Settings(name, limits, defaults, args.request_timeout, tmp_dir, registry, live)
    metrics = Metrics()
    engine = Engine(replicas, args.max_queue, metrics, question_settings, cores=shares[0])
    return create_app(engine, settings, metrics), engine, settings


def check_port_free(host: str, port: int) -> None:
    """Bind the address once before the (slow) model load, as uvicorn will: a busy port or a bad host is one
    line and exit code 2 now, not a "serving on" line followed by uvicorn's exit."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise VideoXLError(f"cannot listen on {host}:{port}: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not count
        try:
            sock.bind(address)
        except OSError as e:
            why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
            raise VideoXLError(f"cannot listen on {host}:{port}: {why}") from None


def serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise VideoXLError("the server needs its extra: pip install 'videoxl[serve]'") from None
    app, engine, settings = build(args)
    engine.start()
    print(f"videoxl: serving {args.model} on http://{args.host}:{args.port}/v1 "
          f"(workers on {', '.join(w.device for w in engine.pool)})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except SystemExit:  # uvicorn exits when it cannot bind (taken since the check): our line, our exit code
        raise VideoXLError(f"cannot listen on {args.host}:{args.port} (is the port in use?)") from None
    finally:
        engine.stop()
        shutil.rmtree(settings.tmp_dir, ignore_errors=True)
    return 0
