"""Issue 25's process-level items: batch workers die with a SIGKILLed parent, memory is checked on the CPU (and
host RAM for offloaded KVs), `serve --demo`."""
import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from videoxl import memory
from videoxl.errors import VideoXLMemoryError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by its new parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL of a parent, as on the audit's Linux")
def test_batch_worker_dies_with_a_sigkilled_parent(tmp_path):
    """A parent spawns a worker the way `videoxl batch` does, and is SIGKILLed: the worker goes too (it was left
    waiting on its task queue for 20-45 s)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp, os, sys, time
        from videoxl.batch.runner import die_with_parent

        def worker(parent, ready):
            die_with_parent(parent)
            open(ready, "w").close()
            time.sleep(120)

        if __name__ == "__main__":
            p = mp.get_context("spawn").Process(target=worker, args=(os.getpid(), sys.argv[1]), daemon=True)
            p.start()
            print(p.pid, flush=True)
            time.sleep(120)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT)
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, str(script), str(ready)], stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 120
    while not ready.exists():  # the worker is up (its imports done) and waiting
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.1)
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_host_available_reads_meminfo(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert memory.host_available(str(info)) == 8000000 * 1024
    assert memory.host_available(str(tmp_path / "missing")) is None


def test_cpu_memory_is_checked_before_any_frame(tiny, clip_path, monkeypatch):
    """On a CPU the estimate is held against MemAvailable (the audit's 100,000 frames grew to 15 GB instead)."""
    model, tokenizer = tiny
    model.kv_cache.clear()
    monkeypatch.setattr(memory, "host_available", lambda *a: 1 << 20)
    monkeypatch.setattr(model, "encode_stream", lambda *a, **k: pytest.fail("decoded frames"))
    with pytest.raises(VideoXLMemoryError) as e:
        model.chat(clip_path, tokenizer, "What?", max_num_frames=16)
    assert re.search(r"free on cpu besides the weights; use at most \d+ frames \(--max-num-frames\)$", str(e.value))


def test_held_images_count_on_the_cpu(tiny):
    """A folder of images is decoded whole: its frames count against the RAM as well."""
    model, tokenizer = tiny
    est = memory.check_fits(model, 8, tokenizer, ["q"], None, 8)
    room = int(est.working * memory.HEADROOM) + 100 * memory.FRAME_BYTES
    real = memory.host_available
    try:
        memory.host_available = lambda *a: room
        memory.check_fits(model, 8, tokenizer, ["q"], None, 8, held_frames=99)
        with pytest.raises(VideoXLMemoryError):
            memory.check_fits(model, 8, tokenizer, ["q"], None, 8, held_frames=200)
    finally:
        memory.host_available = real


def test_offloaded_kvs_need_host_ram():
    from tests.test_memory import full_size_config
    from videoxl.language.prompt import prompt_tokens

    cfg = full_size_config()
    tokens = prompt_tokens(cfg, 10_000)
    # Qwen2.5-7B: 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes = 56 KiB a token
    assert memory.host_kv_bytes(cfg, tokens, 2) == tokens * 28 * 4 * 128 * 2 * 2


def test_serve_demo_builds_without_a_model_folder():
    from tests.serving_helpers import free_port
    from videoxl.cli.serve import add_serve_parser, build

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--demo", "--devices", "cpu", "--port", str(free_port())])
    app, engine, settings = build(args)
    assert settings.served_model == "demo_model" and len(engine.replicas) == 1
