"""The chat-completions request, vLLM's multimodal shape, checked field by field into a `ChatRequest`.

    {"model": ..., "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file:///videos/a.mp4"}, "uuid": "a"},
        {"type": "text", "text": "What happens?"}]}],
     "media_io_kwargs": {"video": {"num_frames": 64, "fps": 1}},   # or max_num_frames / sample_fps / max_sample_fps
     "max_tokens": 128, "temperature": 0, "top_p": 1, "seed": 0, "stop": ["\\n\\n"], "stream": true,
     "stream_options": {"include_usage": true}}

The video (or a list of images) goes in the first user message; later turns are text. A part may carry a
`uuid`: with a URL it names that video for later requests; without one (`"video_url": null`) it asks for a
video the server has seen. Fields this server does not implement are refused when they would change the answer
(`n` > 1, `logprobs`), ignored otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from videoxl.errors import VideoXLError
from videoxl.inputs import MAX_TEXT_TOKENS, check_text
from videoxl.serving.errors import APIError


MAX_TEXT_CHARS = 64 * MAX_TEXT_TOKENS


@dataclass
class MediaPart:
    kind: str  # "video_url" | "image_url"
    url: str | None
    uuid: str | None


@dataclass
class ServerDefaults:
    """What a request gets when it does not say, and the most it may ask for."""

    max_num_frames: int = 150
    sample_fps: float | None = 1.0
    max_sample_fps: float | None = None
    frame_cap: int = 2048
    max_tokens: int = 256
    max_tokens_cap: int = 4096


@dataclass
class ChatRequest:
    model: str
    question: str
    history: list[tuple[str, str]]
    media: list[MediaPart]
    sampling: tuple  # (max_num_frames, sample_fps, max_sample_fps)
    generation: dict  # the model's generation_config
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    system: str | None = None  # the client's system message; None: the model's default


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_request(body, served_model: str, defaults: ServerDefaults) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model must be a string (see GET /v1/models)", "model")
    text_ok(model, "model", "model")
    if model != served_model:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served_model!r}", "model")
    if body.get("n", 1) != 1:
        raise bad("n must be 1", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    question, history, media, system = parse_messages(body.get("messages"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options must be {\"include_usage\": true|false}", "stream_options")
    if len(media) > defaults.frame_cap:
        raise bad(f"{len(media)} images: over the {defaults.frame_cap} frame cap", "messages")
    return ChatRequest(model, question, history, media, parse_sampling(body, defaults),
                       parse_generation(body, defaults), parse_stop(body.get("stop")), stream,
                       bool(options.get("include_usage", False)), system)


def text_ok(text: str, where: str, param: str = "messages") -> str:
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer, file name or log line takes: a 400."""
    try:
        check_text(where, text)
    except VideoXLError as e:
        raise bad(str(e), param) from None
    return text


def parse_messages(messages) -> tuple[str, list[tuple[str, str]], list[MediaPart], str | None]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    turns, media, system = [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}] must be an object with role system, user or assistant", "messages")
        text, parts = message_content(m.get("content"), i)
        if m["role"] in ("system", "developer"):  # replaces the model's default system line
            if i != 0 or parts:
                raise bad(f"messages[{i}]: a system message must be the first message, and text only", "messages")
            system = text
            continue
        if parts and (m["role"] != "user" or turns):
            raise bad(f"messages[{i}]: media parts go in the first user message only", "messages")
        media += parts
        turns.append((m["role"], text, i))
    roles = [r for r, _, _ in turns]
    if not roles or roles[-1] != "user" or any(r != ("user", "assistant")[k % 2] for k, r in enumerate(roles)):
        raise bad("messages must alternate user and assistant, starting and ending with a user message",
                  "messages")
    chars = sum(len(text) for _, text, _ in turns) + len(system or "")
    if chars > MAX_TEXT_CHARS:  # far past the token cap in any tokenisation: refused before a worker counts it
        raise bad(f"the messages' text is {chars} characters; at most {MAX_TEXT_CHARS} (the model takes "
                  f"{MAX_TEXT_TOKENS} tokens of question and history)", "messages")
    for role, text, i in turns:
        if role == "user" and not text.strip():
            raise bad(f"messages[{i}] has no text: ask a question", "messages")
    if not media:
        raise bad("no video: put a video_url part (or image_url parts) in the first user message", "messages")
    kinds = {p.kind for p in media}
    if len(kinds) > 1 or (kinds == {"video_url"} and len(media) > 1):
        raise bad("give one video_url, or image_url parts, not both or several videos", "messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return turns[-1][1], history, media, system


def message_content(content, i: int) -> tuple[str, list[MediaPart]]:
    if isinstance(content, str):
        return text_ok(content, f"messages[{i}].content"), []
    if not isinstance(content, list):
        raise bad(f"messages[{i}].content must be a string or a list of parts", "messages")
    texts, media = [], []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}.text must be a string", "messages")
            texts.append(text_ok(part["text"], f"{where}.text"))
        elif kind in ("video_url", "image_url"):
            media.append(media_part(part, kind, where))
        else:
            raise bad(f"{where}: type must be text, video_url or image_url, got {kind!r}", "messages")
    return "\n".join(texts), media


def media_part(part: dict, kind: str, where: str) -> MediaPart:
    uuid = part.get("uuid")
    if uuid is not None and (not isinstance(uuid, str) or not 0 < len(uuid) <= 256):
        raise bad(f"{where}.uuid must be a string of 1 to 256 characters", "messages")
    ref = part.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if url is not None and (not isinstance(url, str) or not url):
        raise bad(f"{where}.{kind} must be {{\"url\": \"...\"}}", "messages")
    for name, value in (("uuid", uuid), ("url", url)):
        if value is not None:
            text_ok(value, f"{where}.{name}")
    if url is None and uuid is None:
        raise bad(f"{where}: give {kind}.url, or the uuid of a video this server has seen", "messages")
    return MediaPart(kind, url, uuid)


def parse_sampling(body: dict, d: ServerDefaults) -> tuple:
    io = body.get("media_io_kwargs") or {}
    video = io.get("video", {}) if isinstance(io, dict) else None
    if not isinstance(video, dict):
        raise bad("media_io_kwargs must be {\"video\": {\"num_frames\": N, \"fps\": F}}", "media_io_kwargs")
    frames, fps, max_fps = d.max_num_frames, d.sample_fps, d.max_sample_fps
    if "num_frames" in video:
        frames, fps = video["num_frames"], video.get("fps")  # num_frames alone: uniform, as vLLM
    elif "fps" in video:
        fps = video["fps"]
    frames = body.get("max_num_frames", frames)
    fps = body.get("sample_fps", fps)
    max_fps = body.get("max_sample_fps", max_fps)
    if not is_int(frames) or not 1 <= frames <= d.frame_cap:
        raise bad(f"max_num_frames / num_frames must be an integer in [1, {d.frame_cap}], got {frames!r}",
                  "max_num_frames")
    for name, v in (("sample_fps / fps", fps), ("max_sample_fps", max_fps)):
        if v is not None and (not is_number(v) or not 0 < v <= 240):
            raise bad(f"{name} must be a number in (0, 240] or null, got {v!r}", name.split()[0])
    return frames, fps, max_fps


def parse_generation(body: dict, d: ServerDefaults) -> dict:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = d.max_tokens if max_tokens is None else max_tokens
    if not is_int(max_tokens) or not 1 <= max_tokens <= d.max_tokens_cap:
        raise bad(f"max_tokens must be an integer in [1, {d.max_tokens_cap}], got {max_tokens!r}", "max_tokens")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not is_number(temperature) or not 0 <= temperature <= 2:
        raise bad(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise bad(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or abs(seed) >= 2**63):
        raise bad(f"seed must be a 64-bit integer, got {seed!r}", "seed")
    return {"max_new_tokens": max_tokens, "do_sample": temperature > 0, "temperature": float(temperature),
            "top_p": float(top_p), "seed": None if seed is None else seed % 2**63}


def parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop must be a non-empty string or a list of up to 4", "stop")
    return [text_ok(s, "stop", "stop") for s in stop]
