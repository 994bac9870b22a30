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

import copy
import os
import queue
import threading
import time

from videoxl.errors import VideoXLError

MAX_BATCH = 96  # frames handed to the session at once when decoding runs ahead (a vision batch)
QUEUE = 256  # sampled frames decoded ahead of the session


def is_url(source: str) -> bool:
    return "://" in source and not os.path.exists(source)


class SourceReader(threading.Thread):
    """Decodes on its own thread and hands the sampled frames to a second one that appends them, so decoding
    overlaps vision and prefill. That one takes whatever has queued up (up to MAX_BATCH): a live source at
    1 fps goes in frame by frame, a file read faster than real time in vision-sized batches."""

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
        self._sampler = None  # which frames to convert (the session's own sampler decides what it keeps)
        self._queue: queue.Queue | None = None  # to the appending thread; None: append here (read_once alone)
        self._batch: list = []

    def status(self) -> dict:
        return {"source": self.source, "frames_read": self.frames_read, "ended": self.ended, "error": self.error}

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        self._queue = queue.Queue(maxsize=QUEUE)
        appender = threading.Thread(target=self._append_queued, name=self.name + "-append", daemon=True)
        appender.start()
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
            self._put(None)
            appender.join()
            self.ended = True

    def _put(self, item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._halt.is_set() and item is not None:
                    return  # stopping: the frame is dropped; the end marker always goes through

    def _append_queued(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None and len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            frames = [b for b in batch if b is not None]
            if frames and not self._halt.is_set():
                try:
                    self.session.append([f for f, _ in frames], [t for _, t in frames])
                except Exception as e:  # a limit reached, the session closed: stop reading
                    self.error = str(e) if isinstance(e, VideoXLError) else f"{type(e).__name__}: {e}"
                    self._halt.set()
            if batch[-1] is None:
                return

    def _emit(self, frame, t: float) -> None:
        if self._queue is not None:
            self._put((frame, t))
            return
        self._batch.append((frame, t))
        if len(self._batch) >= MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self.session.append([f for f, _ in batch], [t for _, t in batch])

    def read_once(self, strict: bool = False) -> None:
        """Decode from after the last frame read to the current end of the source (a video segment posted to
        the server is read this way, in the caller's thread; `strict`: a file that does not open is an error)."""
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
            stream.thread_type = "AUTO"  # frame threads: a 1080p stream decodes several times faster
            if self._last is not None and stream.time_base is not None:
                try:
                    container.seek(int(self._last / stream.time_base), stream=stream, backward=True)
                except av.error.FFmpegError:
                    pass  # not seekable: decode from the start, skipping what was read
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
                        self._sampler = copy.copy(self.session.sampler)
                        self._shift = self._sampler.default_times(1)[0] - frame.time
                    t = frame.time + self._shift
                    if self._sampler.keep([t]):
                        self._emit(frame.to_ndarray(format="rgb24"), t)
            except av.error.FFmpegError:
                if is_url(self.source):
                    raise
                # the unwritten end of a growing file: what decoded before it is kept
            if self._queue is None:
                self._flush()

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
