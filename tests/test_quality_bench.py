"""bench/quality.py and quality_bilevel.py: the settings each way of choosing blocks sends, the per-kind tallies,
the plot, and (slow) the --quick CPU run end to end."""
from __future__ import annotations

import json
import os
import sys

import pytest

from videoxl.demo import shapes

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import quality_bilevel  # noqa: E402


def test_each_way_of_choosing_sends_its_settings():
    v = shapes.make_video(4, 256)
    grid = quality_bilevel.grid([0.1, 0.25], [4, 16], quality_bilevel.SELECTS)
    assert len(grid) == 12 and grid["bi-level random 0.25 c16"] == {"budget": 0.25, "compression": 16,
                                                                      "select": "random"}
    model = quality_bilevel.sparse_settings(grid["bi-level model 0.1 c4"], v, "needle")
    assert model == {"budget": 0.1, "compression": 4}
    for kind in v.kinds:
        oracle = quality_bilevel.sparse_settings(grid["bi-level oracle 0.1 c4"], v, kind)
        assert oracle["dense_times"] == [list(s) for s in v.evidence(kind)]
    star = v.scenes[v.star]
    assert v.evidence("digit") == [(star.start, star.end - 1)]
    assert v.evidence("time") == [(v.time_n, v.time_n + 3)]
    assert len(v.evidence("count")) == int(v.answers["count"])
    seeds = {quality_bilevel.sparse_settings(grid["bi-level random 0.1 c4"], v, k)["seed"] for k in v.kinds}
    assert len(seeds) == len(v.kinds)  # each question its own draw, the same on every run


def test_tally_is_per_kind_and_per_mode():
    t = quality_bilevel.Tally()
    t.add("dense", {"needle": True, "time": False})
    t.add("dense", {"needle": False, "time": False})
    t.add("bi-level model 0.1 c4", {"needle": True}, kept=0.2)
    rows = {r["mode"]: r for r in t.rows(64, {"bi-level model 0.1 c4": {"select": "model"}})}
    assert rows["dense"]["acc"] == {"needle": 50.0, "time": 0.0} and rows["dense"]["videos"] == 2
    assert rows["bi-level model 0.1 c4"]["kept_share"] == 0.2 and rows["bi-level model 0.1 c4"]["select"] == "model"


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from plot_quality import plot

    acc = {k: 90.0 for k in shapes.KINDS}
    rows = [{"seconds": s, "mode": "dense", "kept_share": 1.0, "acc": acc} for s in (64, 256)]
    rows += [{"seconds": 256, "mode": f"bi-level {w} 0.25 c4", "select": w, "compression": 4, "kept_share": 0.3,
              "acc": acc} for w in quality_bilevel.SELECTS]
    plot([{"device": "cpu", "results": rows}], str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_run_covers_every_mode_and_kind(tmp_path):
    import quality

    out = tmp_path / "q.json"
    assert quality.main(["--quick", "--json", str(out)]) == 0
    rows = json.load(open(out))["results"]
    modes = {r["mode"] for r in rows}
    assert set(quality.DEFAULT_MODES) <= modes
    assert {f"bi-level {w} 0.25 c4" for w in quality_bilevel.SELECTS} <= modes
    assert all(set(r["acc"]) == set(shapes.KINDS) and r["videos"] == 2 for r in rows)
