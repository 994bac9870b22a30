"""The video KV cache (memory LRU + disk) and a model shared by threads."""
import glob
import os
import shutil
import threading

import pytest

import videoxl
from videoxl.checkpoint.tiny import make_demo_video

GREEDY = {"do_sample": False, "max_new_tokens": 8}
ASK = dict(max_num_frames=8, sample_fps=1, generation_config=GREEDY)


@pytest.fixture(scope="module")
def second_clip(tmp_path_factory):
    return make_demo_video(str(tmp_path_factory.mktemp("video2") / "other.mp4"), seconds=4.0, size=(64, 96))


def test_two_threads_on_one_model_are_never_mixed(tiny_dir, clip_path):
    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32")
    questions = ["What happens?", "Describe the scene.", "How many people are in the video?", "What colour?"]
    alone = {q: model.chat(clip_path, tok, q, **ASK) for q in questions}
    assert len(set(alone.values())) > 1  # the questions do lead to different answers
    model.kv_cache.clear()
    got, errors = {}, []

    def ask(q):
        try:
            for _ in range(2):
                got.setdefault(q, []).append(model.chat(clip_path, tok, q, **ASK))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == {q: [a, a] for q, a in alone.items()}
    assert model.kv_cache.counts["vision_runs"] == 2  # once asked alone, once after clear()


def test_an_open_stream_in_the_same_thread_is_an_error_not_a_deadlock(tiny, clip_path):
    model, tok = tiny
    stream = model.stream_chat(clip_path, tok, "What happens?", **ASK)
    next(stream)
    with pytest.raises(videoxl.VideoXLError, match="still open in this thread"):
        model.chat(clip_path, tok, "And then?", **ASK)
    stream.close()
    assert model.chat(clip_path, tok, "And then?", **ASK)


def test_memory_lru_keeps_videos_under_the_budget(tiny_dir, clip_path, second_clip):
    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32", kv_cache_gb=0.01)
    a = model.chat(clip_path, tok, "What happens?", **ASK)
    b = model.chat(second_clip, tok, "What happens?", **ASK)
    assert model.chat(clip_path, tok, "What happens?", **ASK) == a
    assert model.last_stats["kv_cache"] == "memory" and model.last_stats["cached_tokens"] > 0
    assert model.chat(second_clip, tok, "What happens?", **ASK) == b
    assert model.kv_cache.counts == dict(model.kv_cache.counts, vision_runs=2, memory_hits=2, evictions=0)
    # other sampling settings give other KVs: a miss, not a wrong hit
    model.chat(clip_path, tok, "What happens?", max_num_frames=4, sample_fps=1, generation_config=GREEDY)
    assert model.last_stats["kv_cache"] == "miss" and model.kv_cache.counts["vision_runs"] == 3
    # a budget of 0 keeps only the latest video (the default: one user, one video)
    one, _ = videoxl.load(tiny_dir, device="cpu", dtype="float32")
    one.chat(clip_path, tok, "What happens?", **ASK)
    one.chat(second_clip, tok, "What happens?", **ASK)
    assert len(one.kv_cache.entries) == 1 and one.kv_cache.counts["evictions"] == 1


def test_disk_cache_answers_a_new_process_without_vision(tiny_dir, clip_path, tmp_path):
    cache_dir = str(tmp_path / "kv")
    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32", kv_cache_dir=cache_dir)
    first = model.chat(clip_path, tok, "What happens?", **ASK)
    model.kv_cache.flush()
    [entry] = glob.glob(os.path.join(cache_dir, "*", "manifest.json"))
    assert not glob.glob(os.path.join(cache_dir, ".tmp-*"))

    again, tok2 = videoxl.load(tiny_dir, device="cpu", dtype="float32", kv_cache_dir=cache_dir)
    assert again.chat(clip_path, tok2, "What happens?", **ASK) == first
    assert again.last_stats["kv_cache"] == "disk" and again.last_stats["cached_tokens"] > 0
    assert again.kv_cache.counts["vision_runs"] == 0 and again.kv_cache.counts["disk_hits"] == 1
    assert again.chat(clip_path, tok2, "Describe the scene.", **ASK) == \
        model.chat(clip_path, tok, "Describe the scene.", **ASK)  # and the store reads back as it was

    # a damaged file is refused (checksums), removed and rebuilt: same answer, vision ran again
    data = os.path.join(os.path.dirname(entry), "kv.safetensors")
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 64)
        f.write(b"\x7f" * 16)
    third, tok3 = videoxl.load(tiny_dir, device="cpu", dtype="float32", kv_cache_dir=cache_dir)
    assert third.chat(clip_path, tok3, "What happens?", **ASK) == first
    assert third.last_stats["kv_cache"] == "miss" and third.kv_cache.disk.rejected == 1

    # other weights (another seed) never read these KVs
    other_dir = str(tmp_path / "other-ckpt")
    from videoxl.checkpoint.tiny import make_tiny
    make_tiny(other_dir, seed=1)
    other, tok4 = videoxl.load(other_dir, device="cpu", dtype="float32", kv_cache_dir=cache_dir)
    other.chat(clip_path, tok4, "What happens?", **ASK)
    assert other.last_stats["kv_cache"] == "miss"
    shutil.rmtree(other_dir)


def test_bad_cache_settings_are_one_line_errors(tiny_dir, tmp_path):
    with pytest.raises(videoxl.VideoXLError, match="kv_cache_gb"):
        videoxl.load(tiny_dir, device="cpu", kv_cache_gb=-1)
    with pytest.raises(videoxl.VideoXLError, match="kv_cache_dir"):
        videoxl.load(tiny_dir, device="cpu", kv_cache_dir=3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(videoxl.VideoXLError, match="KV cache directory"):
        videoxl.load(tiny_dir, device="cpu", kv_cache_dir=str(tmp_path / "file" / "sub"))


def test_bilevel_extras_count_against_the_budget(tiny_dir, clip_path, second_clip):
    """Bi-level decoding's sparse level and mixed store grow a cached video after it was put: the budget counts
    them, and the older video is evicted (never the one being answered)."""
    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32", kv_cache_gb=0.01)
    model.config.enable_chunk_prefill = True
    model.config.prefill_config = {"chunk_prefill_mode": "mask", "chunk_size": 4, "step_size": 1}
    model.chat(clip_path, tok, "What happens?", **ASK)
    model.chat(second_clip, tok, "What happens?", **ASK)
    a, b = model.kv_cache.entries.values()
    model.kv_cache.max_bytes = a.nbytes + b.nbytes  # both fit, with no room for more
    model.config.enable_sparse, model.config.sparse_config = True, {"budget": 0.5}
    model.chat(second_clip, tok, "What happens?", **ASK)
    assert model.last_stats["kv_cache"] == "memory" and b.decode.nbytes > 0
    assert b.nbytes == b.cache.nbytes + b.decode.nbytes
    assert list(model.kv_cache.entries.values()) == [b] and model.kv_cache.counts["evictions"] == 1
