"""Live sessions over HTTP: a video that is still being recorded, appended piece by piece and asked about.

    POST   /v1/live/sessions                  {"sample_fps": 1, "prefill_config": {...}, ...} -> {"id": ...}
    POST   /v1/live/sessions/{id}/frames      {"images": [data URL or base64, ...], "timestamps": [s, ...]}
                                              or {"video": data URL or base64 of a segment (TS, MKV, MP4...)}
    GET    /v1/live/sessions/{id}             the session's stats
    DELETE /v1/live/sessions/{id}
    questions: POST /v1/chat/completions with a video_url of "session://{id}" (the openai client unchanged)

Caps (`LiveLimits`): sessions at once, frames and KV bytes per session, images per append, idle time (an idle
session is closed). Refusals are OpenAI error objects with a 4xx: 404 unknown session, 413 over a cap, 429 too
many sessions, 400 anything else wrong with the input.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass

from fastapi import Request

from videoxl.errors import VideoXLError
from videoxl.live.session import LiveLimitError, LiveSession
from videoxl.live.source import SourceReader
from videoxl.serving.errors import APIError

SCHEME = "session://"
SETTINGS = ("sample_fps", "enable_chunk_prefill", "prefill_config", "enable_sparse", "sparse_config", "max_frames")


@dataclass
class LiveLimits:
    max_sessions: int = 8
    max_frames: int = 4 * 3600  # per session: 4 hours at 1 fps
    max_bytes: int = 32 * 2**30  # KV bytes per session
    max_images: int = 256  # per append
    idle_s: float = 900.0  # a session nobody appended to or asked about for this long is closed


class LiveSessions:
    """The server's sessions, each on one replica (the one holding fewest), closed when idle too long."""

    def __init__(self, replicas: list[tuple], limits: LiveLimits, settings=None):
        self.replicas, self.limits = replicas, limits
        self.settings = settings  # the server's prefill and bi-level settings: a session's defaults
        self.sessions: dict[str, tuple[LiveSession, list[float]]] = {}
        self._lock = threading.Lock()

    def create(self, body: dict) -> LiveSession:
        if not isinstance(body, dict) or set(body) - set(SETTINGS):
            raise APIError(400, f"session settings must be a JSON object with keys among {list(SETTINGS)}")
        self.reap()
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise APIError(429, f"{len(self.sessions)} live sessions are open, the server's cap; delete one or "
                                    "retry later")
            counts = [sum(s.model is m for s, _ in self.sessions.values()) for m, _ in self.replicas]
            model, tok = self.replicas[counts.index(min(counts))]
            sid = f"live-{uuidlib.uuid4().hex}"
            self.sessions[sid] = (None, [time.monotonic()])  # holds the place while the session is built
        settings = dict(body)
        max_frames = settings.pop("max_frames", self.limits.max_frames)
        if isinstance(max_frames, int) and not isinstance(max_frames, bool) and max_frames > self.limits.max_frames:
            self.drop(sid)
            raise APIError(413, f"max_frames {max_frames} is over the server's cap of {self.limits.max_frames}")
        try:
            session = model.open_live(tok, max_frames=max_frames, max_bytes=self.limits.max_bytes,
                                      settings=self.settings, **settings)
        except BaseException:
            self.drop(sid)
            raise
        session.id = sid
        with self._lock:
            self.sessions[sid] = (session, [time.monotonic()])
        return session

    def get(self, sid: str) -> LiveSession:
        self.reap()
        with self._lock:
            found = self.sessions.get(sid)
        if found is None or found[0] is None or found[0].closed:
            raise APIError(404, f"no live session {sid!r} (never created, deleted, or closed after "
                                f"{self.limits.idle_s:g} s idle)")
        found[1][0] = time.monotonic()
        return found[0]

    def drop(self, sid: str) -> None:
        with self._lock:
            session, _ = self.sessions.pop(sid, (None, None))
        if session is not None:
            session.close()

    def reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, (s, seen) in self.sessions.items()
                    if s is not None and (s.closed or now - seen[0] > self.limits.idle_s)]
        for sid in idle:
            self.drop(sid)

    def close_all(self) -> None:
        for sid in list(self.sessions):
            self.drop(sid)

    def from_url(self, url: str) -> LiveSession:
        return self.get(url[len(SCHEME):])


def payload(text, what: str) -> bytes:
    """A data: URL or plain base64 -> bytes."""
    if not isinstance(text, str) or not text:
        raise APIError(400, f"{what} must be a data: URL or base64 text")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise APIError(400, f"{what}: only base64 data: URLs are accepted")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{what} is not valid base64") from None


def decode_images(items, limit: int) -> list:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(items, list) or not items:
        raise APIError(400, "images must be a non-empty list")
    if len(items) > limit:
        raise APIError(413, f"{len(items)} images in one append: over the server's cap of {limit}")
    out = []
    for i, item in enumerate(items):
        try:
            with Image.open(io.BytesIO(payload(item, f"images[{i}]"))) as img:
                out.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError):
            raise APIError(400, f"images[{i}] is not an image this server can read") from None
    return out


def append(session: LiveSession, body, tmp_dir: str, limits: LiveLimits) -> dict:
    """One append request (run on a worker thread: vision and prefill happen here)."""
    if not isinstance(body, dict) or ("images" in body) == ("video" in body):
        raise APIError(400, "give {\"images\": [...]} (optionally with \"timestamps\") or {\"video\": ...}")
    before = session.stats["frames"] + session.stats["frames_pending"]
    if "images" in body:
        taken = session.append(decode_images(body["images"], limits.max_images), body.get("timestamps"))
    else:
        if "timestamps" in body:
            raise APIError(400, "a video segment carries its own times: no timestamps with \"video\"")
        path = os.path.join(tmp_dir, f"segment-{uuidlib.uuid4().hex}")
        with open(path, "wb") as f:
            f.write(payload(body["video"], "video"))
        try:
            reader = SourceReader(session, path)
            reader.read_once(strict=True)
        finally:
            os.remove(path)
        if reader.frames_read == 0:
            raise APIError(400, "the video segment holds no frame that could be decoded")
        after = session.stats
        taken = {"frames_received": reader.frames_read,
                 "frames_sampled": after["frames"] + after["frames_pending"] - before}
    return {"id": session.id, "object": "live.append", **taken, "session": session.stats}


def add_live_routes(app, sessions: LiveSessions, settings, read_json) -> None:
    async def in_thread(fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except LiveLimitError as e:
            raise APIError(413, str(e)) from None
        except VideoXLError as e:
            raise APIError(400, str(e)) from None

    @app.post("/v1/live/sessions")
    async def create(request: Request):
        body = await read_json(request, settings.max_body_bytes) if await request.body() else {}
        session = await in_thread(sessions.create, body)
        return {"id": session.id, "object": "live.session", "url": SCHEME + session.id, **session.stats}

    @app.post("/v1/live/sessions/{sid}/frames")
    async def frames(sid: str, request: Request):
        body = await read_json(request, settings.max_body_bytes)
        return await in_thread(append, sessions.get(sid), body, settings.tmp_dir, sessions.limits)

    @app.get("/v1/live/sessions/{sid}")
    async def status(sid: str):
        session = sessions.get(sid)
        return {"id": sid, "object": "live.session", "url": SCHEME + sid, **session.stats}

    @app.delete("/v1/live/sessions/{sid}")
    async def delete(sid: str):
        sessions.get(sid)
        await asyncio.to_thread(sessions.drop, sid)
        return {"id": sid, "object": "live.session", "deleted": True}
