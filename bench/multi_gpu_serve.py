"""The serve part of bench/multi_gpu.py (see its docstring), and the helpers both parts share."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from prefill import log


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def question(video: int, q: int) -> str:
    return f"Question {q} about video {video}: what happens, and when?"


def run_command(cmd: list[str], env: dict, budget: Budget, log_path: str) -> tuple[int | None, float]:
    """(exit code, or None when killed at the budget; wall seconds)."""
    t = time.perf_counter()
    with open(log_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=budget.left())
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # at the budget, or this script stopped (Ctrl-C, SIGTERM): no command left running
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return rc, time.perf_counter() - t


def tail(path: str, lines: int = 4) -> list[str]:
    with open(path, errors="replace") as f:
        return f.read().strip().splitlines()[-lines:]


def speedup(part: dict, devices: list[str], key: str) -> None:
    base = part.get(devices[0], {}).get(key)
    for d in devices[1:]:
        if base and part.get(d, {}).get(key):
            part[d]["speedup_vs_first"] = round(part[d][key] / base, 3)


def save(out: str, results: dict) -> None:
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)


# ---- serve ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=max(timeout, 0.1)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:  # refused while starting, or timed out
        return 0, repr(e)


def clients(url: str, jobs: list[tuple[int, int, str]], n: int, args, budget: Budget) -> list[dict]:
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    done, lock = [], threading.Lock()

    def client():
        while budget.left() > 0:
            try:
                i, q, path = todo.get_nowait()
            except queue.Empty:
                return
            body = {"model": "bench", "temperature": 0, "max_tokens": args.tokens, "max_num_frames": args.frames,
                    "sample_fps": 1, "messages": [{"role": "user", "content": [
                        {"type": "video_url", "video_url": {"url": "file://" + path}},
                        {"type": "text", "text": question(i, q)}]}]}
            t = time.perf_counter()
            status, text = http(url + "/v1/chat/completions", body, budget.left())
            row = {"id": f"v{i}-q{q}", "status": status, "s": round(time.perf_counter() - t, 3)}
            if status == 200:
                reply = json.loads(text)
                row.update(answer=reply["choices"][0]["message"]["content"],
                           cached=reply["usage"]["prompt_tokens_details"]["cached_tokens"])
            else:
                row["error"] = text[:300]
            with lock:
                done.append(row)

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def serve(args, ckpt, videos, env, budget, results) -> None:
    jobs = [(i, q, v) for q in range(args.serve_questions) for i, v in enumerate(videos)]  # follow-ups overlap
    first = None
    for setting in args.devices:
        if budget.left() < 10:
            results["serve"][setting] = {"skipped": "out of the run's time budget"}
            continue
        port = free_port()
        cmd = [sys.executable, "-m", "videoxl.cli.main", "serve", "--model", ckpt, "--devices", setting,
               "--port", str(port), "--served-model-name", "bench", "--allowed-local-media-path", args.work,
               "--max-queue", str(len(jobs) + args.clients), "--request-timeout", str(int(budget.left()) + 1),
               "--max-frames", str(max(args.frames, 2048)),
               "--kv-cache-gb", "32"]  # every video's KVs stay (10-min files: ~1.3 GB each): no setting re-builds
        log_path = os.path.join(args.work, f"serve-{setting.replace(',', '_').replace(':', '')}.log")
        url, t0 = f"http://127.0.0.1:{port}", time.perf_counter()
        with open(log_path, "w") as err:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        row = {"clients": args.clients, "requests": len(jobs)}
        try:
            while http(url + "/health", timeout=2)[0] != 200 and p.poll() is None and budget.left() > 0:
                time.sleep(0.5)
            row["startup_s"] = round(time.perf_counter() - t0, 2)
            row["health"] = json.loads(http(url + "/health")[1] or "{}") if p.poll() is None else None
            if not args.no_warmup:  # one short video per worker at once (the router spreads them): kernels
                t = time.perf_counter()  # compiled and graphs captured before the clock starts
                warm = [(j, 0, v) for j, v in enumerate(args.warm[:len(setting.split(","))])]
                row["warmup"] = [r["status"] for r in clients(url, warm, len(warm), args, budget)]
                row["warmup_s"] = round(time.perf_counter() - t, 2)
            log(f"serve on {setting}: up in {row['startup_s']} s; {len(jobs)} requests from {args.clients} clients")
            t = time.perf_counter()
            done = clients(url, jobs, args.clients, args, budget) if p.poll() is None else []
            wall = time.perf_counter() - t
            ok = {r["id"]: r["answer"] for r in done if r["status"] == 200}
            first = first if first is not None else ok
            row.update(wall_s=round(wall, 2), answered=len(ok), failed=len(done) - len(ok),
                       not_asked=len(jobs) - len(done), requests_per_s=round(len(ok) / wall, 3),
                       same_answers_as_first=sum(ok[k] == first.get(k) for k in ok),
                       mixed=sum(k in first and ok[k] != first[k] for k in ok),
                       cached_requests=sum(r.get("cached", 0) > 0 for r in done),
                       errors=[r for r in done if r["status"] != 200][:5],
                       latency_s=sorted(r["s"] for r in done if r["status"] == 200))
            status, text = http(url + "/metrics")
            row["metrics"] = [line for line in text.splitlines() if "device=" in line and (
                "completion_tokens_total" in line or "vision_runs" in line or "memory_hits" in line)]
        finally:
            p.send_signal(signal.SIGINT)  # uvicorn's graceful stop: the workers finish, pending KVs written
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        row["server_exit"], row["stderr_tail"] = p.returncode, tail(log_path)
        results["serve"][setting] = row
        log(f"serve on {setting}: {({k: v for k, v in row.items() if k not in ('latency_s', 'metrics')})}")
        save(args.out, results)
    speedup(results["serve"], args.devices, "requests_per_s")
