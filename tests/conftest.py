"""Shared fixtures: a tiny random-weight checkpoint in the released format and a short synthetic video."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from videoxl.checkpoint.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "ckpt"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import videoxl

    return videoxl.load(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    from videoxl.checkpoint.tiny import make_demo_video

    # 30 fps, 6 s -> 6 frames at 1 fps: pads to 8 (two groups of 4 frames)
    return make_demo_video(str(tmp_path_factory.mktemp("video") / "clip.mp4"), seconds=6.0)


@pytest.fixture(scope="session")
def cut_video(tmp_path_factory):
    """An mp4 whose header (written first: faststart) promises 40 frames at 10 fps, cut after 12 of them and 19
    of the 210 bytes of the 13th: that frame decodes flagged corrupt (up to 255 levels off) and is not read."""
    from fractions import Fraction

    import av

    from tests.media import frame_pixels

    folder = tmp_path_factory.mktemp("cut")
    whole, cut = folder / "whole.mp4", folder / "cut.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for n in range(40):
            frame = av.VideoFrame.from_ndarray(frame_pixels(n), format="rgb24")
            frame.pts, frame.time_base = n, Fraction(1, 10)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return str(cut)
