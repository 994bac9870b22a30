"""Media in: every URL a request names becomes a local file (or is refused) here, and only here.

All the limits live in `MediaLimits`. What is refused, each with a 4xx and one line:
  * `file://` unless the server was started with an allowed folder, and any path that resolves (symlinks
    followed) outside it;
  * `http(s)://` unless the host is in the allowed domains; redirects; hosts that resolve to, or connections
    that land on, private, loopback, link-local or reserved addresses;
  * `data:` URLs whose payload is over the base64 cap or not valid base64;
  * files over the size cap (counted while downloading or decoding, never read whole first), empty files,
    files with no readable video stream, frames larger than the pixel cap, videos longer than the duration cap;
  * any other scheme.
A file's content hash is computed as it is read, and is what the video KV cache is keyed by.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass, field

from videoxl.serving.errors import APIError
from videoxl.cache.identity import content_id, digest_of, new_hasher, remember_content_id

CHUNK = 1 << 20


@dataclass
class MediaLimits:
    allowed_local_path: str | None = None  # file:// is off unless set
    allowed_domains: tuple[str, ...] = ()  # http(s):// is off unless set; exact host names
    max_file_bytes: int = 2 << 30  # a video file, however it arrives
    max_base64_bytes: int = 64 << 20  # a data: URL's payload, encoded
    max_request_bytes: int = 512 << 20  # a whole request body (frames sent as many image data: URLs add up)
    max_duration_s: float = 4 * 3600.0
    max_pixels: int = 7680 * 4320  # per frame (8K): a larger header is a decompression bomb
    fetch_timeout_s: float = 30.0

    def __post_init__(self):
        if self.allowed_local_path is not None:
            self.allowed_local_path = os.path.realpath(self.allowed_local_path)
        self.allowed_domains = tuple(d.lower().rstrip(".") for d in self.allowed_domains)


@dataclass
class MediaFile:
    path: str
    content_id: str
    temporary: bool = False  # ours to delete when the request is done

    def release(self) -> None:
        if self.temporary:
            try:
                os.unlink(self.path)
            except OSError:
                pass


@dataclass
class Media:
    """What resolving one request's media gave: files to read (deleted by `release`), in order."""

    files: list[MediaFile] = field(default_factory=list)

    def release(self) -> None:
        for f in self.files:
            f.release()


def bad(message: str, param: str = "messages") -> APIError:
    return APIError(400, message, param=param)


async def resolve(url: str, kind: str, limits: MediaLimits, tmp_dir: str) -> MediaFile:
    """A `video_url` / `image_url` URL -> a checked local file with its content hash."""
    if not isinstance(url, str) or not url:
        raise bad(f"{kind}.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "file":
        media = await asyncio.to_thread(local_file, url, limits)
    elif scheme == "data":
        media = await asyncio.to_thread(data_url, url, limits, tmp_dir)
    elif scheme in ("http", "https"):
        media = await fetch(url, limits, tmp_dir)
    else:
        shown = (scheme or url[:20]) + ("://" if scheme else "")
        raise bad(f"unsupported {kind} URL scheme {shown!r}; use file://, data:...;base64, or http(s)://")
    try:
        await asyncio.to_thread(probe, media.path, kind, limits)
    except BaseException:
        media.release()
        raise
    return media


def local_file(url: str, limits: MediaLimits) -> MediaFile:
    if limits.allowed_local_path is None:
        raise APIError(403, "file:// URLs are off on this server (start it with --allowed-local-media-path DIR)",
                       param="messages")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad(f"file:// URL with a host ({parsed.netloc!r}); use file:///absolute/path")
    path = os.path.realpath(urllib.parse.unquote(parsed.path))
    root = limits.allowed_local_path
    if os.path.commonpath([path, root]) != root:
        raise APIError(403, f"file path is outside the allowed media folder {root}", param="messages")
    if not os.path.isfile(path):
        raise APIError(404, f"no such file under the allowed media folder: {path}", param="messages")
    size = os.path.getsize(path)
    check_size(size, limits)
    return MediaFile(path, content_id(path))


def check_size(size: int, limits: MediaLimits) -> None:
    if size == 0:
        raise bad("the media file is empty (0 bytes)")
    if size > limits.max_file_bytes:
        raise APIError(413, f"media file is larger than the {limits.max_file_bytes / 2**20:.0f} MiB cap",
                       param="messages")


def data_url(url: str, limits: MediaLimits, tmp_dir: str) -> MediaFile:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad("data URLs must look like data:video/mp4;base64,<payload>")
    mime = head[5:-7].lower()
    if not mime.startswith(("video/", "image/", "application/octet-stream")):
        raise bad(f"data URL media type {mime!r} is not a video or image type")
    if len(payload) > limits.max_base64_bytes:
        raise APIError(413, f"data URL payload is over the {limits.max_base64_bytes / 2**20:.0f} MiB base64 cap",
                       param="messages")
    h = new_hasher()
    fd, path = tempfile.mkstemp(dir=tmp_dir, suffix=".media")
    try:
        with os.fdopen(fd, "wb") as f:
            step = 4 * CHUNK  # a multiple of 4 base64 characters: decodes chunk by chunk
            for start in range(0, len(payload), step):
                try:
                    raw = base64.b64decode(payload[start:start + step], validate=True)
                except (binascii.Error, ValueError):
                    raise bad("data URL payload is not valid base64") from None
                h.update(raw)
                f.write(raw)
        check_size(os.path.getsize(path), limits)
    except BaseException:
        os.unlink(path)
        raise
    return downloaded(path, h)


def downloaded(path: str, h) -> "MediaFile":
    """A temporary media file whose bytes were hashed into `h` as they were written: its content id is known."""
    digest = digest_of(h)
    remember_content_id(path, digest)
    return MediaFile(path, digest, temporary=True)


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def fetch(url: str, limits: MediaLimits, tmp_dir: str) -> MediaFile:
    import httpx

    host = (urllib.parse.urlparse(url).hostname or "").lower().rstrip(".")
    if not limits.allowed_domains:
        raise APIError(403, "http(s) media URLs are off on this server (start it with --allowed-media-domains)",
                       param="messages")
    if host not in limits.allowed_domains:
        raise APIError(403, f"media domain {host!r} is not allowed on this server", param="messages")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise bad(f"cannot resolve media host {host!r}") from None
    if not infos or not all(is_public(info[4][0]) for info in infos):
        raise APIError(403, f"media host {host!r} resolves to a private or loopback address", param="messages")
    h = new_hasher()
    fd, path = tempfile.mkstemp(dir=tmp_dir, suffix=".media")
    try:
        with os.fdopen(fd, "wb") as f:
            async with httpx.AsyncClient(follow_redirects=False, timeout=limits.fetch_timeout_s,
                                         trust_env=False) as client:
                async with client.stream("GET", url) as response:
                    # the address actually connected to, so a DNS answer changed since the check gains nothing
                    stream = response.extensions.get("network_stream")
                    peer = stream.get_extra_info("server_addr") if stream is not None else None
                    if peer is None or not is_public(peer[0]):
                        raise APIError(403, f"media host {host!r} connected to a non-public address",
                                       param="messages")
                    if response.is_redirect:
                        raise bad(f"media URL redirects (HTTP {response.status_code}); redirects are refused")
                    if response.status_code != 200:
                        raise bad(f"media URL answered HTTP {response.status_code}")
                    size = 0
                    async for chunk in response.aiter_bytes(CHUNK):
                        size += len(chunk)
                        if size > limits.max_file_bytes:
                            check_size(size, limits)
                        h.update(chunk)
                        f.write(chunk)
        check_size(os.path.getsize(path), limits)
    except httpx.HTTPError as e:
        os.unlink(path)
        raise bad(f"cannot fetch the media URL: {type(e).__name__}") from None
    except BaseException:
        os.unlink(path)
        raise
    return downloaded(path, h)


def probe(path: str, kind: str, limits: MediaLimits) -> None:
    """Read the header only: a video stream, a frame rate, frames not over the pixel cap, duration under the
    cap. (Frames that turn out corrupt later are caught by the decoder, as a 400.)"""
    if kind == "image_url":
        from PIL import Image

        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception:  # PIL raises many types for bad files
            raise bad("not a readable image") from None
        if w * h > limits.max_pixels:
            raise bad(f"image is {w}x{h}, over the {limits.max_pixels} pixel cap")
        return
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise bad("the file has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            if not rate or float(rate) <= 0:
                raise bad("the video has no frame rate")
            seconds = None
            if stream.duration is not None and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1e6
            elif stream.frames:
                seconds = stream.frames / float(rate)
    except APIError:
        raise
    except Exception:  # PyAV raises FFmpeg errors of many types, and UnicodeDecodeError on some names
        raise bad("not a readable video (corrupt or not a video file)") from None
    if w * h > limits.max_pixels:
        raise bad(f"video frames are {w}x{h}, over the {limits.max_pixels} pixel cap")
    if seconds is not None and seconds > limits.max_duration_s:
        raise bad(f"video is {seconds:.0f} s long, over the {limits.max_duration_s:.0f} s cap")
