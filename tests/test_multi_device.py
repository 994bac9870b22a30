"""Several engine workers (`serve --devices cpu,cpu` here; cuda:0,cuda:1 on a GPU host): a video's follow-ups go to
the worker holding its KVs, new videos to the least loaded, answers never mixed, metrics and /health per worker,
and one disk KV cache shared by the workers."""
import os
import shutil
import threading

import pytest

from videoxl.serving.errors import APIError
from videoxl.serving.router import Router


def test_router_keeps_a_video_on_its_worker_and_spreads_new_ones():
    r = Router(2)
    up = [True, True]
    assert r.pick("a", [0, 0], up) == 0
    assert r.pick("b", [0, 0], up) == 1  # equal loads: the worker holding fewer videos
    assert r.pick("a", [5, 0], up) == 0  # a follow-up waits for the worker with its KVs
    assert r.pick("c", [3, 1], up) == 1  # a new video: the least loaded
    assert r.pick(None, [0, 2], up) == 0  # nothing to keep: least loaded, remembered nowhere
    assert r.held == [1, 2]


def test_router_skips_a_worker_that_is_down_and_moves_its_videos():
    r = Router(2)
    assert r.pick("a", [0, 0], [True, True]) == 0
    assert r.pick("a", [0, 0], [False, True]) == 1
    assert r.pick("a", [0, 0], [True, True]) == 1  # the video's KVs are now on worker 1
    with pytest.raises(APIError) as e:
        r.pick("b", [0, 0], [False, False])
    assert e.value.status == 503


def test_router_forgets_the_least_recently_asked_video_first():
    r = Router(2, remembered=2)
    r.pick("a", [0, 0], [True, True])
    r.pick("b", [0, 0], [True, True])
    r.pick("a", [0, 0], [True, True])  # a is the most recent now
    r.pick("c", [0, 0], [True, True])
    assert set(r.homes) == {"a", "c"} and sum(r.held) == 2


def test_two_workers_writing_one_disk_entry_leave_one_valid_entry(tmp_path):
    import torch

    from videoxl.cache.disk import KVDisk

    disks = [KVDisk(str(tmp_path)), KVDisk(str(tmp_path))]  # two workers' caches on one --kv-cache-dir
    tensors = {"k": torch.arange(4096, dtype=torch.float32), "v": torch.ones(64, 64)}
    errors = []

    def write(disk):
        try:
            for _ in range(5):
                disk.write("entry", {"key": {"a": 1}}, tensors)
        except Exception as e:  # recorded, and fails the test below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(d,)) for d in disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temporary folder left behind
    assert disks[0].writes + disks[1].writes >= 1
    manifest, read = disks[1].read("entry", {"a": 1}, "cpu")
    assert torch.equal(read["k"], tensors["k"]) and torch.equal(read["v"], tensors["v"])
    assert disks[0].rejected == disks[1].rejected == 0


# ---- a live server with two CPU workers ------------------------------------------------------------------------
pytest.importorskip("fastapi")
pytest.importorskip("openai")

from tests.serving_helpers import LiveServer, request, video_part  # noqa: E402
from videoxl.checkpoint.tiny import make_demo_video  # noqa: E402


@pytest.fixture(scope="module")
def two(tiny_dir, clip_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    shutil.copy(clip_path, root / "a.mp4")
    make_demo_video(str(root / "b.mp4"), seconds=4.0, size=(64, 96))
    s = LiveServer(tiny_dir, "--allowed-local-media-path", str(root), "--devices", "cpu,cpu",
                   "--kv-cache-dir", str(tmp_path_factory.mktemp("kv")))
    yield s, root
    s.stop()


def ask(server, root, name, question, **fields):
    r = server.post(request(question, video_part(f"file://{root}/{name}"), **fields))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]


def per_worker(m, name):
    return [m.get(f'{name}{{device="cpu",worker="{i}"}}', 0) for i in (0, 1)]


def test_follow_ups_go_to_the_worker_holding_the_video(two):
    server, root = two
    assert [d["worker"] for d in server.engine.health()] == [0, 1]
    first_a, _ = ask(server, root, "a.mp4", "What happens?")
    first_b, _ = ask(server, root, "b.mp4", "What happens?")
    m = server.metrics()
    assert per_worker(m, "videoxl_kv_cache_vision_runs") == [1, 1]  # one video each
    again_a, usage_a = ask(server, root, "a.mp4", "What happens?")
    again_b, usage_b = ask(server, root, "b.mp4", "What happens?")
    assert (again_a, again_b) == (first_a, first_b)
    assert usage_a["prompt_tokens_details"]["cached_tokens"] > 0 < usage_b["prompt_tokens_details"]["cached_tokens"]
    m = server.metrics()
    assert per_worker(m, "videoxl_kv_cache_vision_runs") == [1, 1]  # no video built twice
    assert per_worker(m, "videoxl_kv_cache_memory_hits") == [1, 1]  # each follow-up on its video's worker
    assert per_worker(m, "videoxl_time_to_first_token_seconds_count") == [2, 2]
    assert m["videoxl_time_to_first_token_seconds_count"] == 4  # the helper's sum over the workers
    # a uuid names the same content: its follow-ups, sent without the video, land on the same worker
    assert server.post(request("Q?", video_part(f"file://{root}/b.mp4", uuid="bee"))).status_code == 200
    r = server.post(request("What happens?", video_part(None, uuid="bee")))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == first_b
    assert per_worker(server.metrics(), "videoxl_kv_cache_memory_hits") == [1, 3]
    # other sampling settings are another cache entry: a new video for the router, on the less loaded worker
    ask(server, root, "a.mp4", "What happens?", max_num_frames=4)
    assert sum(per_worker(server.metrics(), "videoxl_kv_cache_vision_runs")) == 3


def test_concurrent_questions_on_two_videos_are_never_mixed(two):
    server, root = two
    questions = ["What happens?", "Describe the scene.", "What colour is the square?"]
    alone = {(v, q): ask(server, root, v, q)[0] for v in ("a.mp4", "b.mp4") for q in questions}
    got, lock = [], threading.Lock()

    def one(i):
        case = (("a.mp4", "b.mp4")[i % 2], questions[i % 3])
        text = ask(server, root, *case)[0]
        with lock:
            got.append((case, text))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 12 and all(text == alone[case] for case, text in got)
    m = server.metrics()
    assert all(n > 0 for n in per_worker(m, "videoxl_completion_tokens_total"))  # both workers answered


def test_health_names_each_device(two):
    import httpx

    server, _ = two
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [(d["device"], d["worker"], d["up"]) for d in r.json()["devices"]] == [("cpu", 0, True), ("cpu", 1, True)]
    assert [w.remote for w in server.engine.pool] == [False, True]  # the second device's model: its own process
    mine, theirs = server.engine.pool[0].cores, server.engine.pool[1].model.cores  # each its slice of the cores
    assert mine and theirs and not set(mine) & set(theirs) or len(os.sched_getaffinity(0)) < 2
    assert server.metrics()['videoxl_worker_up{device="cpu",worker="1"}'] == 1


def test_a_worker_that_is_down_is_skipped_and_health_says_so(two):
    import httpx

    server, root = two
    before = server.metrics()
    answer = ask(server, root, "b.mp4", "What happens?")[0]  # b's KVs are on worker 1 (the first test)
    worker, alive = server.engine.pool[1], server.engine.pool[1].thread
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    worker.thread = dead  # as if its thread had died
    try:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert [d["up"] for d in r.json()["devices"]] == [True, False]
        assert ask(server, root, "b.mp4", "What happens?")[0] == answer  # answered by worker 0
        m = server.metrics()
        assert m['videoxl_worker_up{device="cpu",worker="1"}'] == 0
        done = per_worker(m, "videoxl_time_to_first_token_seconds_count")
        was = per_worker(before, "videoxl_time_to_first_token_seconds_count")
        assert done == [was[0] + 1, was[1] + 1]  # b's first ask above on worker 1, the one while it was down on 0
    finally:
        worker.thread = alive


def test_metrics_print_every_digit():
    from videoxl.serving.metrics import number

    assert (number(1234567), number(0.25), number(3.0)) == ("1234567", "0.25", "3")
