"""Shared fixtures: a tiny random-weight checkpoint in the released format and a short synthetic video."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from videoxl.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "ckpt"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import videoxl

    return videoxl.load(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    from videoxl.tiny import make_demo_video

    # 30 fps, 6 s -> 6 frames at 1 fps: pads to 8 (two groups of 4 frames)
    return make_demo_video(str(tmp_path_factory.mktemp("video") / "clip.mp4"), seconds=6.0)
