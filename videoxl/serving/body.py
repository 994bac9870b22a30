"""Request bodies: read with a running count against the per-request cap (refused at the first byte over it,
or before reading when Content-Length says so), and against a server-wide budget of body bytes held at once.

A body is held twice while it is parsed (the bytes and the JSON's strings), then once (a data: URL's string)
until its media is written to a file, so each body reserves twice its size from the budget until the request
releases it. A body that does not fit now is refused with 503 before it is read: six clients sending 400 MB at
once cost the budget, not six times 400 MB."""
from __future__ import annotations

import json
import threading

from videoxl.serving.errors import APIError

HELD_COPIES = 2  # bytes + parsed strings, while parsing


class BodyBudget:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = int(max_bytes), 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.max_bytes and self.used > 0:  # one body alone is only bounded by its cap
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Reservation:
    """What one request holds of the budget; `release` (idempotent) gives it back."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.held = budget, 0

    def grow(self, n: int) -> None:
        if not self.budget.take(n):
            raise APIError(503, "the server is receiving too many large requests at once; retry later")
        self.held += n

    def release(self) -> None:
        held, self.held = self.held, 0
        if held:
            self.budget.give(held)


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body over the {limit / 2**20:g} MiB cap (--max-request-mb)")


async def read_json(request, limit: int, reservation: Reservation):
    """The request's JSON body. 413 over `limit`, 503 when the budget is spent, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    size = None
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Content-Length is not a number")
        size = int(declared)
        if size > limit:
            raise too_large(limit)
        reservation.grow(HELD_COPIES * size)
    # with a Content-Length the buffer is made once (growing it would copy it, twice the memory for a moment)
    body, n = bytearray(size or 0), 0
    async for part in request.stream():
        if n + len(part) > limit:
            raise too_large(limit)
        if size is not None:
            if n + len(part) > size:
                raise APIError(400, "the request body is longer than its Content-Length")
            body[n:n + len(part)] = part
        else:
            if HELD_COPIES * (n + len(part)) > reservation.held:  # chunked: reserved as it arrives
                reservation.grow(HELD_COPIES * (n + len(part)) - reservation.held)
            body += part
        n += len(part)
    try:
        text = body[:n].decode("utf-8") if size is not None and n < size else body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid JSON (not UTF-8)") from None
    del body  # the text and, after parsing, its strings: never three copies of a large body at once
    try:
        return json.loads(text)
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply") from None
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
