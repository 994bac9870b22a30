"""The HTTP layer (FastAPI): OpenAI's chat-completions protocol over the engine workers.

POST /v1/chat/completions (JSON, or server-sent events with `"stream": true`), GET /v1/models, GET /health,
GET /metrics. Every refusal is OpenAI's error object with a 4xx status; only a bug is a 500.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from videoxl.serving.engine import Engine, Job
from videoxl.serving.errors import APIError, error_body
from videoxl.serving.live import SCHEME, LiveLimits, LiveSessions, add_live_routes
from videoxl.serving.media import Media, MediaLimits, resolve
from videoxl.serving.metrics import HELP, Metrics
from videoxl.serving.protocol import ChatRequest, ServerDefaults, parse_request
from videoxl.cache.identity import VideoRef

log = logging.getLogger("videoxl.serving")
POLL_S = 0.25  # how often a waiting request checks that its client is still there


@dataclass
class Settings:
    served_model: str
    limits: MediaLimits = field(default_factory=MediaLimits)
    defaults: ServerDefaults = field(default_factory=ServerDefaults)
    request_timeout_s: float = 600.0
    tmp_dir: str = "/tmp"
    registry_path: str | None = None  # where uuids are remembered across restarts (in the KV cache folder)
    live: LiveLimits = field(default_factory=LiveLimits)

    @property
    def max_body_bytes(self) -> int:
        return max(self.limits.max_request_bytes, self.limits.max_base64_bytes + (1 << 20))


class UuidRegistry:
    """uuid -> (content id, local path or None): what a part's `uuid` names, saved next to the KV cache."""

    def __init__(self, path: str | None):
        self.path, self.names = path, {}
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self.names = {k: tuple(v) for k, v in json.load(f).items()}
            except (OSError, ValueError) as e:
                log.warning("ignoring an unreadable uuid registry %s: %s", path, e)

    def remember(self, name: str, content: str, local_path: str | None) -> None:
        if self.names.get(name) == (content, local_path):
            return
        self.names[name] = (content, local_path)
        if self.path:
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.names, f)
            os.replace(tmp, self.path)


def create_app(engine: Engine, settings: Settings, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="videoxl", docs_url=None, redoc_url=None, openapi_url=None)
    registry = UuidRegistry(settings.registry_path)
    live = app.state.live = LiveSessions(engine.replicas, settings.live, engine.settings)
    add_live_routes(app, live, settings, read_json)

    def error_response(e: APIError):
        metrics.count("videoxl_requests_total", status=str(e.status))
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e):
        return JSONResponse(error_body(400, str(e)), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    @app.get("/health")
    async def health():
        ok = engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model, "object": "model", "created": 0,
                                            "owned_by": "videoxl"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.gauges(), HELP),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, settings.max_body_bytes)
        req = parse_request(body, settings.served_model, settings.defaults)
        media = Media()
        try:
            video = await video_ref(req, media)
            job = Job(req, video, time.monotonic() + settings.request_timeout_s, asyncio.get_running_loop(),
                      release=media.release)
            engine.submit(job)
        except BaseException:
            media.release()
            raise
        try:
            first = await next_event(job, request)
        except BaseException:
            job.cancelled.set()
            raise
        if first[0] == "error":
            raise APIError(first[1], first[2])
        if req.stream:
            return StreamingResponse(sse(job, req, first, request), media_type="text/event-stream")
        text, event = [], first
        while event[0] == "delta":
            text.append(event[1])
            event = await next_event(job, request)
        if event[0] == "error":
            raise APIError(event[1], event[2])
        metrics.count("videoxl_requests_total", status="200")
        return {"id": f"chatcmpl-{uuidlib.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.served_model, "usage": event[1],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": event[2], "logprobs": None}]}

    async def next_event(job: Job, request) -> tuple:
        """The worker's next event; a client that went away (checked every POLL_S, however fast events come)
        cancels the job."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= job.next_check:
                job.next_check = loop.time() + POLL_S
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise APIError(499, "client closed the request")
            try:
                return await asyncio.wait_for(job.events.get(), max(0.0, job.next_check - loop.time()))
            except asyncio.TimeoutError:
                continue

    async def sse(job: Job, req: ChatRequest, event: tuple, request: Request):
        cid, created = f"chatcmpl-{uuidlib.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": settings.served_model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                    if choices else []}
            if req.include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        status = "499"  # unless the stream ends: the client went away
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if event[0] == "delta":
                    yield chunk({"content": event[1]})
                elif event[0] == "done":
                    yield chunk({}, finish=event[2])
                    if req.include_usage:
                        yield chunk({}, usage=event[1], choices=False)
                    yield "data: [DONE]\n\n"
                    status = "200"
                    return
                else:
                    status = str(event[1])
                    yield f"data: {json.dumps(error_body(event[1], event[2]))}\n\n"
                    return
                try:  # polling the connection: a send to a gone client may not raise here
                    event = await next_event(job, request)
                except APIError:
                    return  # the client went away (the job is cancelled)
        finally:
            job.cancelled.set()  # a client gone mid-stream stops the generation (no-op once done)
            metrics.count("videoxl_requests_total", status=status)

    async def video_ref(req: ChatRequest, media: Media) -> VideoRef:
        part = req.media[0]
        if part.url is not None and part.url.startswith(SCHEME):  # a live session: answered over its frames
            return live.from_url(part.url)
        if part.url is None:  # a uuid alone: a video seen before
            if part.uuid not in registry.names:
                raise APIError(400, f"unknown uuid {part.uuid!r}: send the video with this uuid first", "messages")
            content, local = registry.names[part.uuid]
            if local and os.path.isfile(local) and settings.limits.allowed_local_path:
                found = await resolve("file://" + local, part.kind, settings.limits, settings.tmp_dir)
                return VideoRef(found.content_id, found.path)
            return VideoRef(content)  # from the KV cache only
        for p in req.media:
            if p.url is None:
                raise APIError(400, "every image_url part needs a url", "messages")
            media.files.append(await resolve(p.url, p.kind, settings.limits, settings.tmp_dir))
        files = media.files
        if part.kind == "video_url":
            ref = VideoRef(files[0].content_id, files[0].path)
        else:
            ident = hashlib.sha256("|".join(f.content_id for f in files).encode()).hexdigest()
            ref = VideoRef(f"images:{ident}", tuple(f.path for f in files))
        if part.uuid is not None:
            registry.remember(part.uuid, ref.id, None if files[0].temporary or len(files) > 1 else files[0].path)
        return ref

    return app


async def read_json(request, limit: int):
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over the {limit / 2**20:.0f} MiB cap")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"request body over the {limit / 2**20:.0f} MiB cap")
        chunks.append(part)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
