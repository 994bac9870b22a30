"""A live `videoxl serve` in a thread (uvicorn on a free port), and request builders for the tests."""
from __future__ import annotations

import argparse
import base64
import shutil
import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model_dir: str, *options: str):
        import uvicorn

        from videoxl.cli.serve import add_serve_parser, build

        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        self.port = free_port()
        args = parser.parse_args(["serve", "--model", model_dir, "--port", str(self.port), "--devices", "cpu",
                                  "--served-model-name", "tiny", *options])
        self.app, self.engine, self.settings = build(args)
        self.engine.start()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, body, **kw) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        """Every series as printed, and each per-worker series (labels device and worker only) also summed under
        its bare name, as PromQL's `sum without (device, worker)` would."""
        text = httpx.get(self.url + "/metrics").text
        out, totals = {}, {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
                bare, _, labels = name.partition("{")
                if labels and {kv.split("=")[0] for kv in labels.rstrip("}").split(",")} == {"device", "worker"}:
                    totals[bare] = totals.get(bare, 0.0) + float(value)
        return {**totals, **out}

    def healthy(self) -> bool:
        return httpx.get(self.url + "/health").status_code == 200

    def stop(self) -> None:
        if self.server.should_exit:
            return
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()
        shutil.rmtree(self.settings.tmp_dir, ignore_errors=True)


def video_part(url: str, uuid: str | None = None) -> dict:
    part = {"type": "video_url", "video_url": None if url is None else {"url": url}}
    if uuid is not None:
        part["uuid"] = uuid
    return part


def messages(question: str, *parts: dict) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def request(question: str, *parts: dict, **fields) -> dict:
    body = {"model": "tiny", "messages": messages(question, *parts), "max_tokens": 10, "temperature": 0,
            "max_num_frames": 8}
    body.update(fields)
    return body


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:video/mp4;base64," + base64.b64encode(f.read()).decode()


class held_generation:
    """The server's generations held open after `after` pieces until `release` is set (or the context ends), so a
    test of a client leaving, or of a time limit, does not race the machine's speed."""

    def __init__(self, server, after: int = 0):
        self.model = server.engine.replicas[0][0]
        self.after, self.release = after, threading.Event()

    def __enter__(self):
        real, after, release = self.model.stream_chat, self.after, self.release
        self.real = real

        def held(*args, **kwargs):
            for i, piece in enumerate(real(*args, **kwargs)):
                if i == after:
                    release.wait(60)
                yield piece
            if after == 0:  # nothing came out at all: still hold the answer's end
                release.wait(60)

        self.model.stream_chat = held
        return self.release

    def __exit__(self, *exc):
        self.release.set()
        self.model.stream_chat = self.real
