"""Evaluation with lmms-eval: the `videoxl` model plugin and the local `videoxl_shapes` task.

    pip install "videoxl[eval]"
    lmms-eval --model videoxl --model_args pretrained=PATH,preset=videomme_chunk --tasks videomme

lmms-eval finds the model through the `lmms_eval.models` entry point, which calls `manifest()` here. The logic
(runner.py, scoring.py, settings.py) does not import lmms-eval; only plugin.py, the thin class lmms-eval loads,
does.
"""
from __future__ import annotations


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest naming our plugin class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="videoxl", simple_class_path="videoxl.eval.plugin.VideoXLEval")
