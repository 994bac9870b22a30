"""Answering a batch: one model per device, each taking whole videos (all their questions) off a shared list.

- One device: in this process.
- Several devices on this machine (`cuda:0,cuda:1`): one spawned process per device, fed through a queue;
  a process that dies takes only its current video with it (its rows are reported failed, the rest go on).
- A Ray cluster (`ray_address`): one Ray actor per worker (a GPU each when the cluster has GPUs), fed video by
  video through an ActorPool, so the batch scales past one machine on an engine that schedules, restarts and
  places work for us.
Every worker answers the same way (`Worker.answer`): the rows' order inside a video is kept, a failure is that
row's `error`, and the video's KVs are reused by its later questions through the model's video KV cache.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from videoxl.errors import VideoXLError
from videoxl.settings import Settings as QuestionSettings
from videoxl.batch.jobs import Job
from videoxl.video.read import core_shares, pin_to_cores, usable_core_ids

PARENT_POLL_S = 0.5  # how often a worker process checks that the batch process is still there
STAT_KEYS = ("ttft_s", "decode_tokens_per_s", "generated_tokens", "prompt_tokens", "cached_tokens", "kv_cache",
             "frames", "vision_s", "prefill_s", "kept_share", "video_decoder", "video_decode_s")


@dataclass
class Settings:
    """What every worker needs to build its model and answer the same way; plain data, so it pickles."""
    model_dir: str
    dtype: str | None = None
    generation: dict = field(default_factory=dict)
    prefill_config: dict | None = None
    sparse_config: dict | None = None
    kv_cache_dir: str | None = None
    quantize: str | None = None
    vision_dtype: str | None = None
    kv_dtype: str | None = None


class Worker:
    def __init__(self, settings: Settings, device: str | None, first: list[Job] | None = None):
        """`first`: the video this worker will answer first; its frames are decoded while the weights load."""
        import videoxl

        prefetch = _prefetch(first, device)
        try:
            self.model, self.tokenizer = videoxl.load(settings.model_dir, device=device, dtype=settings.dtype,
                                                      kv_cache_dir=settings.kv_cache_dir,
                                                      quantize=settings.quantize, vision_dtype=settings.vision_dtype,
                                                      kv_dtype=settings.kv_dtype)
        except BaseException:
            if prefetch is not None:
                prefetch.cancel()
            raise
        self.model.prefetched = prefetch
        self.settings = QuestionSettings.build(settings.prefill_config, settings.sparse_config, settings.generation)
        self.device = str(self.model.device)

    def answer(self, jobs: list[Job]) -> list[dict]:
        out = []
        for job in jobs:
            frames, fps, max_fps = job.sampling
            try:
                answer = self.model.chat(job.video, self.tokenizer, job.question, max_num_frames=frames,
                                         sample_fps=fps, max_sample_fps=max_fps, settings=self.settings)
            except VideoXLError as e:  # this row's problem (its video, its length): the batch goes on
                out.append(job.record(error=str(e)))
                continue
            stats = {k: v for k, v in self.model.last_stats.items() if k in STAT_KEYS}
            out.append(job.record(answer=answer, stats=dict(stats, device=self.device)))
        return out


def run(settings: Settings, groups: list[list[Job]], devices: list[str | None], ray_address: str | None = None,
        ray_workers: int = 0, on_ready: Callable[[str, float], None] | None = None) -> Iterator[list[dict]]:
    """The records of each video's rows, a video at a time, in the order they finish. `ray_workers` 0: one
    actor per GPU of the cluster (at least one). `on_ready(device, seconds)`: a worker process has its model
    (several devices; a late one takes fewer videos, as workers take the next video when free)."""
    if not groups:
        return
    if ray_address is not None:
        yield from _on_ray(settings, groups, ray_address, ray_workers)
    elif len(devices) == 1:
        worker = Worker(settings, devices[0], groups[0])
        for group in groups:
            yield worker.answer(group)
    else:
        yield from _in_processes(settings, groups, devices, on_ready)


# ---- several devices on this machine ------------------------------------------------------------------------
def die_with_parent(parent: int) -> None:
    """End this worker process when the batch process that started it dies (SIGKILL included), instead of
    waiting on its task queue: the kernel's parent-death signal on Linux, and a watch on the parent's pid."""
    import signal
    import threading
    import time

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: the watch below does it

    def watch():
        while os.getppid() == parent:  # reparented (to init or a subreaper): the parent is gone
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="videoxl-parent-watch", daemon=True).start()


def _prefetch(first: list[Job] | None, device: str | None):
    """Start decoding the first video's frames now, while the weights load (video/prefetch.py), as chat does."""
    if not first:
        return None
    from videoxl.devices import parse_device
    from videoxl.video.prefetch import Prefetch

    job = first[0]
    try:
        return Prefetch(job.video, job.sampling, parse_device(device))
    except Exception:  # noqa: BLE001 - the question reads the video itself and reports what is wrong
        return None


def _serve(settings: Settings, device: str, tasks, results, parent: int | None = None,
           cores: list[int] | None = None, here: bool = False, first=None) -> None:
    """A worker: its first video (`first`, else the queue's next) is taken (and its frames decoded) before the
    model loads; a model that fails to load fails that video's rows, and the other workers go on with the rest.
    `here`: a thread of the batch process itself, on `device` as named (no process start or second torch
    import)."""
    if parent is not None:
        die_with_parent(parent)
    pin_to_cores(cores)
    visible = device if here or not device.startswith("cuda:") else "cuda:0"
    if not here and device.startswith("cuda:"):  # this process sees its GPU alone, as cuda:0 (as Ray does)
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    item = first if first is not None else tasks.get()
    try:
        worker = Worker(settings, visible, None if item is None else item[1])
        worker.device = device
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        why = f"{type(e).__name__}: {e}"
        results.put(("failed", device, why))
        if item is not None:
            results.put(("done", item[0], [job.record(error=f"not answered: {device}: {why}") for job in item[1]]))
        return
    results.put(("ready", device, None))
    while item is not None:
        index, group = item
        results.put(("done", index, worker.answer(group)))
        item = tasks.get()


def _in_processes(settings: Settings, groups: list[list[Job]], devices: list[str],
                  on_ready: Callable[[str, float], None] | None = None) -> Iterator[list[dict]]:
    """The first device is served by a thread of this process (its torch is imported already), handed the first
    video at once (it decodes while the spawned processes still start); the other devices by spawned processes,
    which take the rest from a queue. Each takes its own slice of the cores."""
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in list(enumerate(groups))[1:]:
        tasks.put(item)
    shares = core_shares(usable_core_ids(), len(devices))
    procs = [ctx.Process(target=_serve, args=(settings, d, tasks, results, os.getpid(), shares[i]), daemon=True)
             for i, d in enumerate(devices) if i > 0]
    for p in procs:
        tasks.put(None)
        p.start()
    tasks.put(None)
    local = threading.Thread(target=_serve, args=(settings, devices[0], tasks, results, None, shares[0], True,
                                                  (0, groups[0])), name="videoxl-batch-worker", daemon=True)
    local.start()
    workers = [*procs, local]
    pending, failed = set(range(len(groups))), []
    try:
        while pending:
            try:
                kind, key, payload = results.get(timeout=5)
            except queue_mod.Empty:
                if not any(w.is_alive() for w in workers):  # every worker gone: what is left cannot be answered
                    why = "; ".join(failed) or "the workers exited"
                    for i in sorted(pending):
                        yield [job.record(error=f"not answered: {why}") for job in groups[i]]
                    return
                continue
            if kind == "failed":
                failed.append(f"{key}: {payload}")
            elif kind == "ready" and on_ready is not None:
                on_ready(key, time.perf_counter() - t0)
            elif kind == "done" and key in pending:
                pending.discard(key)
                yield payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


# ---- a Ray cluster ----------------------------------------------------------------------------------------------
def _on_ray(settings: Settings, groups: list[list[Job]], address: str, workers: int) -> Iterator[list[dict]]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise VideoXLError("--ray needs Ray: pip install 'ray>=2.40'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False, include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(Worker)
    count = min(workers or int(gpus) or 1, len(groups))
    actors = [actor.remote(settings, None, groups[i]) for i in range(count)]  # each decodes its first video
    pool, answer = ActorPool([]), lambda a, group: a.answer.remote(group)
    for a, group in zip(actors, groups):  # actor i's first video is the one it decoded while loading
        pool.push(a)
        pool.submit(answer, group)
    for group in groups[count:]:  # then whichever actor is free takes the next
        pool.submit(answer, group)
    while pool.has_next():
        yield pool.get_next_unordered()
