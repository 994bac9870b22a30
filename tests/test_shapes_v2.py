"""Version 2 of the "shapes" task (synthetic-task.md, "Version 2"): rings, the seven-segment digit on the star, the
digit / count / time questions. The geometry is checked on drawn frames, measured from the pixels."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from videoxl.demo import shapes

BG = np.array(shapes.BACKGROUND)


def test_question_texts_are_the_specs():
    v = shapes.make_video(0, 64)
    q = v.questions
    assert {k: q[k] for k in shapes.V1_KINDS} == {
        "needle": "What colour is the star?", "first": "What colour is the shape at the start of the video?",
        "last": "What colour is the shape at the end of the video?", "after": "What shape comes right after the star?"}
    assert q["digit"] == "What number is on the star?" and q["count"] == "How many rings are there?"
    assert q["time"] == f"What colour is the shape at {v.time_n} seconds?"
    assert set(v.answers) == set(shapes.KINDS) == set(q)


@pytest.mark.parametrize("seconds", [12, 16, 64, 256, 1024])
def test_rings_count_and_placement(seconds):
    counts, after = Counter(), Counter()
    for seed in range(60):
        v = shapes.make_video(seed, seconds)
        rings = [i for i, s in enumerate(v.scenes) if s.shape == "ring"]
        assert 0 <= len(rings) <= min(3, len(v.scenes) - 3)
        assert all(0 < i < len(v.scenes) - 1 and i != v.star for i in rings)
        assert v.answers["count"] == str(len(rings))
        assert all(a.colour != b.colour for a, b in zip(v.scenes, v.scenes[1:]))
        counts[len(rings)] += 1
        after[v.answers["after"]] += 1
    top = min(3, max(len(shapes.make_video(s, seconds).scenes) - 3 for s in range(60)))
    assert set(counts) == set(range(top + 1))  # every allowed number occurs (drawn uniformly)
    if seconds >= 256:
        assert after["ring"] > 0  # the shape after the star may be a ring


def test_version2_is_version1_with_rings_and_a_digit():
    for seed in range(10):
        v1, v2 = shapes.make_video(seed, 64, version=1), shapes.make_video(seed, 64)
        assert set(v1.answers) == set(v1.questions) == set(shapes.V1_KINDS)
        for a, b in zip(v1.scenes, v2.scenes):
            assert replace(b, shape=a.shape, digit=-1) == a and b.shape in (a.shape, "ring")
        assert 0 <= v2.scenes[v2.star].digit <= 9 and v1.scenes[v1.star].digit == -1


@pytest.mark.parametrize("seconds", [16, 64, 1024])
def test_time_question_rules(seconds):
    ns = set()
    for seed in range(40):
        v = shapes.make_video(seed, seconds)
        n = v.time_n
        assert n % 4 == 0 and 0 <= n and n + 3 < seconds
        assert v.scene_at(n) is v.scene_at(n + 3)  # N..N+3 inside one scene
        assert n in shapes.time_seconds(v.scenes)
        assert v.answers["time"] == v.scene_at(n).colour
        ns.add(n)
    assert len(ns) >= min(4, seconds // 4)  # drawn at random among the allowed seconds, not a fixed one
    v = shapes.make_video(3, seconds, noise=0.0)  # the colour on screen at N..N+3 seconds is the answer
    frames = shapes.render(v, 2 * torch.arange(v.time_n, v.time_n + 4)).numpy()  # the 1-fps frames N..N+3
    want = np.array(shapes.COLOURS[v.answers["time"]])
    assert all((f[np.any(f != BG, -1)] == want).all(-1).mean() > 0.9 for f in frames)


def test_time_seconds_rule():
    s = [shapes.Scene(0, 6, "circle", "red", 0, 0, 1, 0, 0), shapes.Scene(6, 13, "star", "blue", 0, 0, 1, 0, 0),
         shapes.Scene(13, 17, "square", "red", 0, 0, 1, 0, 0)]
    assert shapes.time_seconds(s) == [0, 8]  # 4..7 crosses into the star's scene; 12..15 crosses too


def fg_box(frame):
    fg = np.any(frame != BG, -1)
    rows, cols = np.nonzero(fg.any(1))[0], np.nonzero(fg.any(0))[0]
    return fg, rows[0], rows[-1], cols[0], cols[-1]


@pytest.mark.parametrize("size", [(320, 240), (640, 480)])
def test_ring_stroke_is_15_percent_of_the_diameter(size):
    seen = 0
    for seed in range(12):
        v = shapes.make_video(seed, 64, *size, noise=0.0)
        rings = [s for s in v.scenes if s.shape == "ring"]
        for s, f in zip(rings, shapes.render(v, [2 * s.start for s in rings]).numpy() if rings else []):
            fg, top, bottom, left, right = fg_box(f)
            assert (f[fg] == np.array(shapes.COLOURS[s.colour])).all()
            diameter = bottom - top + 1
            assert abs(diameter - s.size) <= 2 and abs(right - left + 1 - diameter) <= 2
            row = fg[(top + bottom) // 2]  # through the centre: two strokes and the hole
            edges = np.flatnonzero(np.diff(row.astype(int)))
            assert len(edges) == 4
            strokes = edges[1] - edges[0], edges[3] - edges[2]
            assert all(abs(w - 0.15 * diameter) <= 2 for w in strokes), (strokes, diameter)
            seen += 1
    assert seen >= 6


@pytest.mark.parametrize("digit", range(10))
def test_digit_segments_on_the_star(digit):
    v = shapes.make_video(5, 64, 640, 480, noise=0.0)
    v.scenes[v.star] = star = replace(v.scenes[v.star], digit=digit, vx=0.0, vy=0.0)
    f = shapes.render(v, [2 * star.start]).numpy()[0]
    assert v.answers["digit"] == str(digit)
    fg, top, bottom, left, right = fg_box(f)
    cy, cx, box = (top + bottom + 1) / 2, (left + right + 1) / 2, bottom - top + 1
    ink = (f == 0).all(-1)
    assert ((f[fg] == 0).all(-1) | (f[fg] == np.array(shapes.COLOURS[star.colour])).all(-1)).all()
    h = 0.36 * box
    w, bar = h / 2, 0.18 * h
    ys, xs = np.nonzero(ink)
    assert abs((ys.min() + ys.max() + 1) / 2 - cy) <= 1.5 + h / 2 * (digit in (1, 4, 7))  # no a/d bar: shorter
    centres = {"a": (0, -h / 2 + bar / 2), "b": (w / 2 - bar / 2, -h / 4), "c": (w / 2 - bar / 2, h / 4),
               "d": (0, h / 2 - bar / 2), "e": (-w / 2 + bar / 2, h / 4), "f": (-w / 2 + bar / 2, -h / 4),
               "g": (0, 0)}
    lit = {seg: bool(ink[int(cy + dy), int(cx + dx)]) for seg, (dx, dy) in centres.items()}
    assert {seg for seg, on in lit.items() if on} == set(shapes.SEGMENTS[digit])
    if digit == 8:  # the whole digit: its height, its width, the thickness of its bars
        assert abs(ys.max() - ys.min() + 1 - h) <= 2 and abs(xs.max() - xs.min() + 1 - w) <= 2
        column = np.flatnonzero(ink[:, int(cx)])  # a, g and d crossed at the centre column
        runs = np.split(column, np.flatnonzero(np.diff(column) > 1) + 1)
        assert len(runs) == 3 and all(abs(len(r) - bar) <= 1.5 for r in runs)


def test_only_the_star_carries_ink():
    v = shapes.make_video(9, 64, noise=0.0)
    frames = shapes.frames_1fps(v).numpy()
    black = (frames == 0).all(-1).any((1, 2))
    star = v.scenes[v.star]
    assert black[star.start:star.end].all() and not black[:star.start].any() and not black[star.end:].any()


def test_training_video_sampler_accepts_any_size():
    v = shapes.sample_video(np.random.default_rng(1), 32, 160, 120, noise=0.0)
    assert shapes.render(v, torch.arange(4)).shape == (4, 120, 160, 3)
