"""The peak-memory estimate against the GPU measurements in bench/results (H200, bf16, full-size architecture),
the README's frames-per-card table against the estimate, and the check that stops a run before any frame."""
import importlib.util
import os
import re

import pytest

import videoxl.memory as memory
from videoxl.errors import VideoXLMemoryError
from videoxl.checkpoint.tiny import full_size_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
GiB = 2**30


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(ROOT, "bench", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(bench):
    return bench.full_size_weights()


def test_estimate_within_15_percent_of_measured_peaks(bench, weights):
    rows = bench.comparison(weights)
    assert {(r["frames"], r["mode"]) for r in rows} >= {(f, m) for f in (256, 1024, 2048, 4096, 10000)
                                                         for m in ("dense", "mask", "streaming+offload")}
    worst = max(rows, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= 0.15, worst


def test_readme_table_is_the_estimate(bench, weights):
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = {(m.group(1), m.group(2), m.group(3)): [int(x.replace(",", "")) for x in m.groups()[3:]]
             for m in re.finditer(r"^\| ([a-z+]+) \(\d+\) \| (\w+) \| (\w+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| "
                                  r"([\d,]+) \|$", readme, re.M)}
    all_weights = {p: bench.full_size_weights(None if p == "bf16" else p) for p in bench.PRECISIONS}
    assert all_weights["bf16"] == weights and all_weights["int4"] < all_weights["int8"] < 0.61 * weights
    expected = {(r["mode"], r["weights"], r["kv"]): [r[f"{gb}GB"] for gb in bench.CARDS_GB]
                for r in bench.card_table(all_weights)}
    assert len(table) == 24  # 4 modes x 3 weight precisions x 2 KV dtypes
    assert table == expected


def test_suggestions_name_a_setting_that_fits(weights):
    cfg = full_size_config()
    budget = 23 * GiB  # a 24 GB card less its CUDA context
    dense = memory.estimate(cfg, 4096, "dense", weights)
    assert dense.weights + dense.working * memory.HEADROOM > budget  # does not fit dense
    assert memory.suggestion(cfg, 4096, 40, budget, 2, weights, "dense", 96) == (
        "use --chunk-prefill streaming --offload --vision-chunk 24 (prefill_config chunk_prefill_mode/offload)")
    most = memory.max_frames(cfg, budget, "streaming+offload", weights, 8)
    assert 4096 < most < 100000
    assert memory.suggestion(cfg, 100000, 40, budget, 2, weights, "dense", 96) == (
        f"use --max-num-frames {most} with --chunk-prefill streaming --offload --vision-chunk 8")
    fitted = memory.estimate(cfg, most, "streaming+offload", weights, None, 8)
    assert fitted.weights + fitted.working * memory.HEADROOM <= budget


def test_estimate_grows_with_frames_and_offload_saves(weights):
    cfg = full_size_config()
    e = {m: memory.estimate(cfg, 4096, m, weights).total for m in memory.MODES}
    assert e["streaming+offload"] < e["dense"] < e["mask"]
    assert memory.estimate(cfg, 8192, "dense", weights).total > e["dense"]


def test_check_stops_before_any_frame(tiny, clip_path, monkeypatch):
    model, tokenizer = tiny
    model.kv_cache.clear()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1 << 20)  # 1 MiB free
    monkeypatch.setattr(model, "encode_stream", lambda *a, **k: pytest.fail("decoded frames"))
    with pytest.raises(VideoXLMemoryError) as e:
        model.chat(clip_path, tokenizer, "What?", max_num_frames=16)
    text = str(e.value)
    assert re.match(r"^6 frames need ~\d+\.\d GiB in dense mode \(\d+\.\d GiB weights \+ \d+\.\d GiB working "
                    r"memory\); 0\.0 GiB free on cpu besides the weights; ", text), text
    assert "\n" not in text


def test_check_passes_when_it_fits(tiny, clip_path, monkeypatch):
    model, tokenizer = tiny
    model.kv_cache.clear()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1 << 40)
    assert model.chat(clip_path, tokenizer, "What?", max_num_frames=16, generation_config={"max_new_tokens": 3})
