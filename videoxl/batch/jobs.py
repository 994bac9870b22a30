"""A batch's questions and answers as JSON Lines.

Input, one object a line: `{"video": PATH, "question": TEXT}`, optionally with `"id"` (default: the line number)
and the row's own `max_num_frames`, `sample_fps`, `max_sample_fps`. Relative video paths are read from the input
file's folder, so a dataset folder can be moved whole. The whole file is checked before any model loads: a bad
row stops the run with one line naming it.

Output, one object a line, appended as each answer comes: `{"id", "video", "question", "answer", "stats"}`, or
`"error"` instead of `"answer"` when that row failed (a damaged video, say; the other rows go on). A second run
with the same output file skips the rows already answered and retries the failed ones, so a crash or an
interrupted run loses at most the line being written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from videoxl.errors import VideoXLError
from videoxl.video.sources import check_readable, check_sampling

ROW_KEYS = ("id", "video", "question", "max_num_frames", "sample_fps", "max_sample_fps")


@dataclass(frozen=True)
class Job:
    id: str
    video: str
    question: str
    sampling: tuple  # (max_num_frames, sample_fps, max_sample_fps)

    def record(self, **result) -> dict:
        return {"id": self.id, "video": self.video, "question": self.question, **result}


def read_jobs(path: str, default_sampling: tuple) -> list[Job]:
    """Every row of the input file as a Job, checked (keys, types, video files exist, sampling, unique ids)."""
    if not isinstance(path, (str, os.PathLike)):
        raise VideoXLError(f"the batch input must be a path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise VideoXLError(f"batch input not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    jobs, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                job = parse_row(line, n, folder, default_sampling)
                if job.id in seen:
                    raise VideoXLError(f"{path} line {n}: id {job.id!r} is used twice")
                seen.add(job.id)
                jobs.append(job)
    if not jobs:
        raise VideoXLError(f"{path} has no rows (one JSON object a line: {{\"video\": ..., \"question\": ...}})")
    return jobs


def parse_row(line: str, n: int, folder: str, default_sampling: tuple) -> Job:
    def bad(why: str) -> VideoXLError:
        return VideoXLError(f"line {n}: {why}")

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise bad(f"not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise bad(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(ROW_KEYS))
    if unknown:
        raise bad(f"unknown key {unknown[0]!r} (known: {', '.join(ROW_KEYS)})")
    video, question, ident = row.get("video"), row.get("question"), row.get("id", n)
    if not isinstance(video, str) or not video:
        raise bad('"video" must be a file path')
    if not isinstance(question, str) or not question.strip():
        raise bad('"question" must be a non-empty string')
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise bad('"id" must be a string or an integer')
    path = video if os.path.isabs(video) else os.path.join(folder, video)
    if not os.path.exists(path):
        raise bad(f"video not found: {path}")
    try:
        check_readable(path)  # a FIFO or /dev/zero would hang the run
    except VideoXLError as e:
        raise bad(str(e)) from None
    frames, fps, max_fps = default_sampling
    sampling = (row.get("max_num_frames", frames), row.get("sample_fps", fps), row.get("max_sample_fps", max_fps))
    try:
        check_sampling(*sampling)
    except VideoXLError as e:
        raise bad(str(e)) from None
    return Job(str(ident), os.path.normpath(path), question, sampling)


def by_video(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped by video and sampling, in first-appearance order: a group's video is prefilled once."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.video, job.sampling), []).append(job)
    return list(groups.values())


def lock(f, path: str) -> None:
    """An exclusive lock on the open output file for the life of this process (the kernel drops it when the
    process dies, even by SIGKILL): a second run on the same output would write every row twice."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise VideoXLError(f"another videoxl batch is writing to {path}: wait for it to finish, or use another "
                           "-o") from None


class Output:
    """The output file: what earlier runs answered, and appending, a flushed line per answer."""

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)):
            raise VideoXLError(f"the batch output must be a path, got {type(path).__name__}")
        if os.path.isdir(path):
            raise VideoXLError(f"the batch output is a folder: {path}")
        if os.path.exists(path) and not os.path.isfile(path):
            raise VideoXLError(f"the batch output is not a regular file (a FIFO or device?): {path}")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise VideoXLError(f"the batch output's folder does not exist: {parent}")
        self.path, self.answered = path, set()
        self._file = open(path, "a", encoding="utf-8")
        lock(self._file, path)
        self._read_earlier()

    def _read_earlier(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        whole = data[:data.rfind(b"\n") + 1]  # a line cut by a crash is dropped, then rewritten
        if len(whole) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "answer" in row and "id" in row:
                self.answered.add(str(row["id"]))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
