"""`videoxl batch INPUT.jsonl -o OUTPUT.jsonl`: many questions about many videos, resumable, on one or more
devices or a Ray cluster. Input and output formats: jobs.py; workers: runner.py."""
from __future__ import annotations

import argparse
import os
import time

from videoxl.cli.options import (add_chunk_args, add_generation_args, add_quantize_arg, add_sampling_args, add_sparse_args,
                                card_dicts, check_before_load, generation_config, parse_devices)
from videoxl.cli.console import err
from videoxl.errors import VideoXLError


def add_batch_parser(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("batch", formatter_class=formatter_class,
                       help="answer a JSON Lines file of {video, question} rows into another, resumable")
    p.add_argument("input", help='JSON Lines, one {"video": PATH, "question": TEXT} a line (optional "id", '
                                 '"max_num_frames", "sample_fps", "max_sample_fps"); paths relative to its folder')
    p.add_argument("-o", "--output", required=True,
                   help="JSON Lines of answers, appended; rows already answered there are skipped (required)")
    p.add_argument("--model", help="checkpoint folder; needed unless --demo (default: none)")
    p.add_argument("--demo", action="store_true", help="use the tiny demo model shipped in the package")
    p.add_argument("--devices", default="auto",
                   help="comma-separated, one worker each (cuda:0,cuda:1); auto = every GPU, else cpu")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the workers as Ray actors on this cluster ('auto', 'ray://host:10001', or 'local' "
                        "for a cluster of this machine); videoxl must be installed on its nodes (default: off)")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray actors to start; 0 = one per GPU of the cluster (at least 1)")
    p.add_argument("--kv-cache-dir", default=None,
                   help="keep videos' KVs here too: a rerun or another batch on the same videos skips vision")
    add_quantize_arg(p)
    add_sampling_args(p)
    add_generation_args(p)
    add_chunk_args(p)
    add_sparse_args(p)
    return p


def cmd_batch(args) -> int:
    from videoxl.batch.jobs import Output, by_video, read_jobs
    from videoxl.batch.runner import Settings, run

    if args.demo == bool(args.model):
        raise VideoXLError("give --model DIR (a checkpoint folder) or --demo, one of them")
    if args.workers < 0:
        raise VideoXLError(f"--workers must be >= 0, got {args.workers}")
    if args.workers and args.ray is None:
        raise VideoXLError("--workers only applies with --ray (on this machine, --devices sets the workers)")
    if args.model and not os.path.isdir(args.model):
        raise VideoXLError(f"model folder not found: {args.model}")
    prefill, sparse = card_dicts(check_before_load(args, None))
    jobs = read_jobs(args.input, (args.max_num_frames, args.sample_fps, args.max_sample_fps))
    devices = parse_devices(args.devices) if args.ray is None else [None]
    out = Output(args.output)
    todo = [job for job in jobs if job.id not in out.answered]
    groups = by_video(todo)
    skipped = len(jobs) - len(todo)
    err(f"{len(jobs)} rows, {len(todo)} to answer ({skipped} answered in {args.output} already), "
        f"{len(groups)} videos, on {'Ray ' + args.ray if args.ray else ', '.join(map(str, devices))}")
    from videoxl.demo import demo_model_path

    # by name: a positional list once dropped --kv-dtype without a word
    settings = Settings(model_dir=args.model or demo_model_path(), dtype=args.dtype, generation=generation_config(args),
                        prefill_config=prefill, sparse_config=sparse, kv_cache_dir=args.kv_cache_dir,
                        quantize=args.quantize, vision_dtype=args.vision_dtype, kv_dtype=args.kv_dtype)
    t0, answered, failed = time.perf_counter(), 0, 0
    try:
        def ready(device, seconds):
            err(f"{device}: model ready after {seconds:.1f} s")

        for n, records in enumerate(run(settings, groups, devices, args.ray, args.workers, ready), 1):
            for record in records:
                out.write(record)
                ok = "answer" in record
                answered, failed = answered + ok, failed + (not ok)
                if not ok:
                    err(f"row {record['id']}: {record['error']}")
            err(f"[{n}/{len(groups)} videos, {answered + failed}/{len(todo)} rows, "
                f"{time.perf_counter() - t0:.1f} s] {os.path.basename(records[0]['video']) if records else ''}")
    finally:
        out.close()
    retry = " (their error is in the output; run again to retry them)" if failed else ""
    err(f"done: {answered} answered, {failed} failed{retry}, {skipped} skipped, {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0
