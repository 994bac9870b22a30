"""A video file's content id (BLAKE3 of its bytes: never the old id for changed bytes, hashed beside decoding),
and the timeline of a question's stages."""
import os
import shutil

import blake3

import videoxl
from videoxl.cache import identity

ASK = dict(max_num_frames=8, sample_fps=1, generation_config={"do_sample": False, "max_new_tokens": 4})


def flip_middle_byte_keeping_mtime(path):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_the_id_is_blake3_of_the_bytes_and_changes_with_one_byte(tmp_path):
    path = tmp_path / "v.bin"
    path.write_bytes(os.urandom(3 << 20))
    first = identity.content_id(str(path))
    assert first == "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
    flip_middle_byte_keeping_mtime(path)
    assert identity.content_id(str(path)) == "blake3:" + blake3.blake3(path.read_bytes()).hexdigest() != first
    assert identity.content_id(str(tmp_path / "missing.mp4")) is None


def test_a_settled_file_is_hashed_once_a_fresh_one_every_time(tmp_path, monkeypatch):
    path = tmp_path / "v.bin"
    path.write_bytes(b"x" * 1000)
    hashed = []
    real = identity.new_hasher
    monkeypatch.setattr(identity, "new_hasher", lambda: hashed.append(1) or real())
    identity.content_id(str(path)), identity.content_id(str(path))
    assert len(hashed) == 2  # written just now: its stat could hide a rewrite in the same clock tick
    monkeypatch.setattr(identity, "_now_ns", lambda: os.stat(path).st_ctime_ns + identity.SETTLED_NS)
    ids = {identity.content_id(str(path)) for _ in range(3)}
    assert len(hashed) == 3 and len(ids) == 1


def test_a_changed_file_with_its_mtime_restored_misses_the_cache(tiny_dir, clip_path, tmp_path):
    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32", kv_cache_gb=0.01)
    path = str(tmp_path / "clip.mp4")
    shutil.copyfile(clip_path, path)
    model.chat(path, tok, "What happens?", **ASK)
    [key] = model.kv_cache.entries  # keyed once the hash, run beside decoding, was done
    assert key.video == identity.content_id(path) and model.last_stats["kv_cache"] == "miss"
    model.chat(path, tok, "What happens?", **ASK)
    assert model.last_stats["kv_cache"] == "memory"
    flip_middle_byte_keeping_mtime(path)
    model.chat(path, tok, "What happens?", **ASK)
    assert model.last_stats["kv_cache"] == "miss" and model.kv_cache.counts["vision_runs"] == 2
    assert {k.video for k in model.kv_cache.entries} == {key.video, identity.content_id(path)}


def test_the_lookup_waits_for_the_hash_only_when_a_kept_entry_could_match(tiny_dir, clip_path, tmp_path):
    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32", kv_cache_gb=0.01)
    assert not model.kv_cache.may_hold(os.path.getsize(clip_path))
    model.chat(clip_path, tok, "What happens?", **ASK)
    assert model.kv_cache.may_hold(os.path.getsize(clip_path)) and not model.kv_cache.may_hold(1)
    copy = str(tmp_path / "same_bytes_other_name.mp4")
    shutil.copyfile(clip_path, copy)
    model.chat(copy, tok, "What happens?", **ASK)  # same size: waits for the hash, and finds the same bytes
    assert model.last_stats["kv_cache"] == "memory" and model.kv_cache.counts["vision_runs"] == 1


def test_the_timeline_shows_each_stage_of_a_question(tiny, clip_path, tmp_path):
    from videoxl.timeline import idle_waiting, merged

    model, tok = tiny
    path = str(tmp_path / "fresh.mp4")
    shutil.copyfile(clip_path, path)
    model.chat(path, tok, "What happens?", max_num_frames=8, sample_fps=1, generation_config={"max_new_tokens": 4})
    events = model.last_stats["timeline"]
    stages = {e[0] for e in events}
    assert {"hash", "decode", "vision", "prefill", "first_token", "answer"} <= stages
    assert all(0 <= s <= e for _, s, e in events)
    [(_, prefill_start, prefill_end)] = [e for e in events if e[0] == "prefill"]
    assert prefill_start >= max(e for st, _, e in events if st == "vision")  # prefill after the last slice
    [(_, first_start, first_end)] = [e for e in events if e[0] == "first_token"]
    assert first_start >= prefill_end and model.last_stats["ttft_s"] >= first_end - 0.01
    assert 0 <= idle_waiting(events) <= merged(events, ["decode", "vision"])[-1][1]
    model.chat(path, tok, "And then?", max_num_frames=8, sample_fps=1, generation_config={"max_new_tokens": 4})
    assert {e[0] for e in model.last_stats["timeline"]} == {"first_token", "answer"}  # from the cache


def test_idle_waiting_is_the_gap_between_vision_slices_after_the_first_frames():
    from videoxl.timeline import idle_waiting

    events = [("decode", 0.0, 1.0), ("vision", 1.0, 1.5), ("decode", 1.0, 3.0), ("vision", 3.0, 3.5)]
    assert idle_waiting(events) == 1.5
