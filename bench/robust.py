"""Issue 25's measurable targets on the CPU, against a real `videoxl serve --demo` process:

    python bench/robust.py --out bench/results/robust-cpu.json [--frames 600] [--body-mb 400] [--bodies 6]

  freed_s      a client gives up 1 s into a `--frames`-frame request (demo model, CPU); seconds from its
               disconnect until /metrics shows no running request (the worker is free) (target <= 0.5 s)
  next_s       the next (small) request's wall time right after that disconnect
  timeout_504_s  wall time of the same request under `--request-timeout 2`: when its 504 arrives (<= 2.5 s)
  rss          the server's peak resident memory (VmHWM) and the highest sampled VmRSS while `--bodies` clients send
               `--body-mb` MB bodies at once (a data: URL video each, Content-Length set), and the statuses they
               got (target <= 1.5 GB, or bodies refused before they are read)
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from videoxl.checkpoint.tiny import make_demo_video  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, media: str, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "videoxl.cli.main", "serve", "--demo", "--devices", "cpu", "--port",
               str(self.port), "--served-model-name", "demo", "--allowed-local-media-path", media, *options]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.time() < deadline, self.proc.stderr.read()
            time.sleep(0.2)

    def running(self) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("videoxl_running_requests "):
                return float(line.split()[1])
        return 0.0

    def memory(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def body(url: str, frames: int, question: str = "What colour is the star?") -> dict:
    return {"model": "demo", "max_tokens": 8, "temperature": 0, "max_num_frames": frames, "sample_fps": 1,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}


def disconnect_and_free(server: Server, video: str, frames: int, small: str) -> dict:
    t0 = time.monotonic()
    try:
        httpx.post(server.url + "/v1/chat/completions", json=body("file://" + video, frames), timeout=1.0)
    except httpx.ReadTimeout:
        pass
    gone = time.monotonic()
    while server.running() > 0:
        time.sleep(0.01)
    freed = time.monotonic() - gone
    t1 = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json=body("file://" + small, 8), timeout=120)
    return {"client_gave_up_after_s": round(gone - t0, 3), "freed_s": round(freed, 3),
            "next_status": r.status_code, "next_s": round(time.monotonic() - t1, 3)}


def full_run_s(server: Server, video: str, frames: int) -> float:
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json=body("file://" + video, frames), timeout=600)
    assert r.status_code == 200, r.text
    return round(time.monotonic() - t0, 3)


def timeout_504(server: Server, video: str, frames: int) -> dict:
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json=body("file://" + video, frames), timeout=120)
    arrived = time.monotonic() - t0
    while server.running() > 0:
        time.sleep(0.01)
    return {"status": r.status_code, "timeout_504_s": round(arrived, 3),
            "worker_free_after_s": round(time.monotonic() - t0, 3)}


def big_bodies(server: Server, mb: int, clients: int) -> dict:
    """`clients` threads each stream a `mb` MB JSON body (a data: URL of zero bytes) with Content-Length."""
    head = json.dumps(body("data:video/mp4;base64,@", 8)).encode()
    before, after = head.split(b"@")
    chunk = base64.b64encode(bytes(3 << 20))  # 4 MiB of base64 per chunk
    n = (mb << 20) // len(chunk)
    length = len(before) + n * len(chunk) + len(after)

    def gen():
        yield before
        for _ in range(n):
            yield chunk
        yield after

    statuses, peak, stop = [], [0], threading.Event()

    def send():
        try:
            r = httpx.post(server.url + "/v1/chat/completions", content=gen(), timeout=600,
                           headers={"content-type": "application/json", "content-length": str(length)})
            statuses.append(r.status_code)
        except httpx.HTTPError as e:
            statuses.append(type(e).__name__)

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], server.memory("VmRSS"))
            time.sleep(0.05)

    rss0 = server.memory("VmRSS")
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=send) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    return {"bodies": clients, "body_mb": round(length / 2**20), "statuses": sorted(map(str, statuses)),
            "seconds": round(time.monotonic() - t0, 2), "rss_before_gb": round(rss0 / 1e9, 2),
            "rss_peak_sampled_gb": round(peak[0] / 1e9, 2), "vm_hwm_gb": round(server.memory("VmHWM") / 1e9, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--body-mb", type=int, default=400)
    p.add_argument("--bodies", type=int, default=6)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    media = tempfile.mkdtemp(prefix="videoxl-robust-")
    video = make_demo_video(os.path.join(media, "long.mp4"), seconds=args.frames, fps=1, size=(96, 64))
    small = make_demo_video(os.path.join(media, "small.mp4"), seconds=8, fps=1, size=(96, 64))
    out = {"frames": args.frames, "cpu_cores": os.cpu_count()}
    server = Server(media)
    try:
        # what an abandoned request would cost (4 frames fewer: its KVs are cached under another key)
        out["full_request_s"] = full_run_s(server, video, args.frames - 4)
        out["disconnect"] = disconnect_and_free(server, video, args.frames, small)
    finally:
        server.stop()
    server = Server(media, "--request-timeout", "2")
    try:
        out["timeout"] = timeout_504(server, video, args.frames)
    finally:
        server.stop()
    server = Server(media)
    try:
        out["bodies"] = big_bodies(server, args.body_mb, args.bodies)
    finally:
        server.stop()
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
