"""The demo: a synthetic task ("shapes", `shapes.py`) and the tiny model trained on it (`demo_model/`).

This face stays light: `import videoxl` reaches `demo_model_path` here without importing the task's drawing code.
"""
from __future__ import annotations

import os


def demo_model_path() -> str:
    """The folder of the shipped demo weights (released format, loadable by `videoxl.load`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def cache_dir() -> str:
    """Where the demo writes its videos: $VIDEOXL_CACHE, else $XDG_CACHE_HOME/videoxl, else ~/.cache/videoxl."""
    root = os.environ.get("VIDEOXL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "videoxl")
    return os.path.join(root, "demo")
