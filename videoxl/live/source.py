"""A background reader that feeds a live session from a file still being written or from a stream.

A file: decode to the end, wait, reopen and go on after the last frame read (seeking near it), until the
session closes. The end of a file being written may hold half a packet: a frame the decoder flags corrupt, or an
error there, means "not written yet", and is read again on the next pass. Formats whose index is written at the
end (plain MP4) cannot be read while growing; MPEG-TS, Matroska and fragmented MP4 can.
A URL (rtsp://, http://, udp://, ...): decoded as it comes, until it ends or the session closes.

Only frames the session's sampler will keep are converted to RGB (a 1080p30 source at 1 fps: one in 30).
Times are the source's, shifted so that its first frame lands one sample period after the session's last.
"""
from __future__ import annotations

import os
import threading
import time

from videoxl.errors import VideoXLError

BATCH = 8  # frames handed to the session at once: a group of 4 is prefilled as soon as it is complete


def is_url(source: str) -> bool:
    return "://" in source and not os.path.exists(source)


class SourceReader(threading.Thread):
    def __init__(self, session, source, poll_s: float = 0.25):
        if not isinstance(source, (str, os.PathLike)):
            raise VideoXLError(f"append_source takes a path or a URL, got {type(source).__name__}")
        source = os.fspath(source)
        if not is_url(source) and not os.path.exists(source):
            raise VideoXLError(f"live source not found: {source}")
        super().__init__(name=f"videoxl-live-{os.path.basename(source)}", daemon=True)
        self.session, self.source, self.poll_s = session, source, poll_s
        self.error: str | None = None
        self.frames_read = 0
        self.ended = False
        self._halt = threading.Event()
        self._last: float | None = None  # source time of the last frame read
        self._shift: float | None = None  # source time -> session time

    def status(self) -> dict:
        return {"source": self.source, "frames_read": self.frames_read, "ended": self.ended, "error": self.error}

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        try:
            if is_url(self.source):
                self.read_once()
            else:
                while not self._halt.is_set():
                    self.read_once()
                    self._halt.wait(self.poll_s)
        except VideoXLError as e:
            self.error = str(e)
        except Exception as e:  # a background thread has nobody to raise to: kept for `stats`
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ended = True

    def read_once(self, strict: bool = False) -> None:
        """Decode from after the last frame read to the current end of the source, in this thread (a video
        segment posted to the server is read this way, `strict`: a file that does not open is an error)."""
        import av

        try:
            container = av.open(self.source, timeout=10.0)
        except (av.error.FFmpegError, OSError):
            if strict or is_url(self.source):
                raise VideoXLError(f"cannot open live source {self.source}") from None
            return  # a file without a readable header yet: try again on the next pass
        with container:
            if not container.streams.video:
                raise VideoXLError(f"live source has no video stream: {self.source}")
            stream = container.streams.video[0]
            if self._last is not None and stream.time_base is not None:
                try:
                    container.seek(int(self._last / stream.time_base), stream=stream, backward=True)
                except av.error.FFmpegError:
                    pass  # not seekable: decode from the start, skipping what was read
            batch, times = [], []
            try:
                for frame in container.decode(stream):
                    if self._halt.is_set():
                        break
                    if frame.time is None or (self._last is not None and frame.time <= self._last + 1e-6):
                        continue
                    if getattr(frame, "is_corrupt", False):
                        break  # half written: read again next pass
                    self._last = frame.time
                    self.frames_read += 1
                    if self._shift is None:
                        self._shift = self.session.sampler.default_times(1)[0] - frame.time
                    t = frame.time + self._shift
                    if self.session.sampler.due is None or t >= self.session.sampler.due - 1e-6:
                        batch.append(frame.to_ndarray(format="rgb24"))
                        times.append(t)
                    if len(batch) >= BATCH:
                        self.session.append(batch, times)
                        batch, times = [], []
            except av.error.FFmpegError:
                if is_url(self.source):
                    raise
                # the unwritten end of a growing file: what decoded before it is kept
            if batch:
                self.session.append(batch, times)

    def __repr__(self) -> str:
        return f"SourceReader({self.source!r}, frames_read={self.frames_read}, error={self.error!r})"


def wait_for(condition, timeout: float, poll: float = 0.05) -> bool:
    """Poll `condition()` until it holds or `timeout` seconds pass (for callers following a session)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(poll)
    return condition()
