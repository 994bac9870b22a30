"""The plugin through lmms-eval itself (skipped where lmms-eval is not installed: `pip install "videoxl[eval]"`).

The `lmms-eval` command on the local task, with the demo model, through the plugin and through `videoxl serve`
(lmms-eval's `openai` model, pass_video_url=True), is right or wrong on exactly the documents bench/quality.py is.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

import videoxl  # noqa: E402
from videoxl.eval import manifest, shapes_task  # noqa: E402
from tests.test_eval import demo, expected, task  # noqa: E402,F401  (the fixtures)

DEMO = videoxl.demo_model_path()


def test_the_entry_point_names_our_class():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from videoxl.eval.plugin import VideoXLEval

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("videoxl") is VideoXLEval


def test_bad_model_args_stop_with_one_line():
    from videoxl.eval.plugin import VideoXLEval

    with pytest.raises(SystemExit) as e:
        VideoXLEval.create_from_arg_string(f"pretrained={DEMO},frames=many", {"batch_size": 1, "device": None})
    assert str(e.value) == "videoxl: model_args frames must be an integer, got 'many'"


def lmms_eval(tmp, *args) -> dict[str, float]:
    """Run the lmms-eval command; per (task, doc_id), its score (from --log_samples)."""
    exe = os.path.join(os.path.dirname(sys.executable), "lmms-eval")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY="unused",
               HF_DATASETS_CACHE=os.path.join(tmp, "hf"))
    out = os.path.join(tmp, "out")
    run = subprocess.run([exe, *args, "--output_path", out, "--log_samples"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    scores = {}
    for path in glob.glob(os.path.join(out, "**", "*samples*.jsonl"), recursive=True):
        with open(path) as f:
            for line in f:
                s = json.loads(line)
                scores[(os.path.basename(path).split("_samples_")[1].removesuffix(".jsonl"), s["doc_id"])] = s["acc"]
    return scores


def test_lmms_eval_command_equals_quality(task, expected, tmp_path):  # noqa: F811
    folder = os.path.dirname(os.path.dirname(task[0]["video"]))
    scores = lmms_eval(str(tmp_path), "--model", "videoxl", "--model_args", f"pretrained={DEMO},preset=shapes",
                       "--tasks", ",".join(shapes_task.TASKS), "--include_path", folder)
    assert {task[i]["id"]: bool(v) for (t, i), v in scores.items() if t == "videoxl_shapes"} == expected
    mc = [v for (t, _), v in scores.items() if t == "videoxl_shapes_mc"]
    assert len(mc) == len(task)


def test_lmms_eval_openai_route_equals_quality(task, expected, tmp_path):  # noqa: F811
    from tests.serving_helpers import LiveServer

    folder = os.path.dirname(os.path.dirname(task[0]["video"]))
    server = LiveServer(DEMO, "--allowed-local-media-path", folder)
    try:
        scores = lmms_eval(str(tmp_path), "--model", "openai", "--model_args",
                           f"model_version=tiny,base_url={server.url}/v1,pass_video_url=True,"
                           f"max_frames_num={task[0]['seconds']},max_retries=1,num_concurrent=2",
                           "--tasks", "videoxl_shapes", "--include_path", folder)
    finally:
        server.stop()
    assert {task[i]["id"]: bool(v) for (_, i), v in scores.items()} == expected
