"""Tests of videoxl/video/sources.py: frame sampling by the reference's rules, decoding real files, stills, bad input.

Expected indices are written out literally (worked by hand from the reference's rules, shown in comments)
rather than recomputed with the same formula, so a test cannot agree with a wrong implementation by
sharing its mistake. The reference's rules (Video-XL-2 evaluation code):
  step = round(video_fps / sample_fps)      Python round: halves go to the even neighbour (12.5 -> 12)
  indices = range(0, N, step)               step < 1 clamped to 1 (our fix; the reference would crash)
  max_sample_fps: higher = min(max_num_frames // len(indices), max_sample_fps);
                  if higher > sample_fps: step = round(video_fps / higher), resample
  more than max_num_frames left: np.linspace(0, N-1, max_num_frames) truncated to int
  sample_fps=None: np.linspace(0, N-1, min(max_num_frames, N)) truncated to int
  timestamp = round(index / video_fps, 1)
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.media import frame_pixels, make_corrupt_video, make_text_file, make_video
from videoxl.errors import VideoXLError
from videoxl.video.sources import load_video, resize_frame, sample_frame_indices


# ---------------------------------------------------------------------------------------------------------
# sample_frame_indices: literal expectations
# ---------------------------------------------------------------------------------------------------------

FULLY_LITERAL = [
    # (total_frames, video_fps, max_num_frames, sample_fps, max_sample_fps) -> indices
    pytest.param(300, 30, 150, 1, None,
                 # 10 s at 30 fps, 1 fps: step round(30/1)=30 -> 10 frames, under the cap
                 [0, 30, 60, 90, 120, 150, 180, 210, 240, 270], id="10s@30-1fps"),
    pytest.param(60, 30, 150, 2, None,
                 # step round(30/2)=15
                 [0, 15, 30, 45], id="2s@30-2fps"),
    pytest.param(300, 30, 150, 0.5, None,
                 # step round(30/0.5)=60: a float sample_fps
                 [0, 60, 120, 180, 240], id="10s@30-0.5fps"),
    pytest.param(300, 30, 150, 1, 4,
                 # step 30 -> 10 frames; higher = min(150 // 10, 4) = min(15, 4) = 4 > 1
                 # -> step round(30/4) = round(7.5) = 8 (7.5 goes to the even 8) -> range(0, 300, 8): 38 frames
                 [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144, 152,
                  160, 168, 176, 184, 192, 200, 208, 216, 224, 232, 240, 248, 256, 264, 272, 280, 288, 296],
                 id="10s@30-max4"),
    pytest.param(300, 30, 16, 0.5, 2,
                 # step 60 -> 5 frames; higher = min(16 // 5, 2) = min(3, 2) = 2 > 0.5 -> step round(15)=15
                 # -> 20 frames > 16 -> linspace(0, 299, 16): i * 299/15 = i * 19.933.. truncated
                 [0, 19, 39, 59, 79, 99, 119, 139, 159, 179, 199, 219, 239, 259, 279, 299],
                 id="10s@30-max2-then-linspace"),
    pytest.param(300, 30, 8, None, None,
                 # uniform: linspace(0, 299, 8): i * 42.714.. truncated
                 [0, 42, 85, 128, 170, 213, 256, 299], id="uniform-8-of-300"),
    pytest.param(5, 30, 8, None, None,
                 # uniform with fewer frames than the cap: min(8, 5) = 5 -> every frame
                 [0, 1, 2, 3, 4], id="uniform-short"),
    pytest.param(250, 25, 150, 2, None,
                 # 25 fps, 2 fps: round(12.5) = 12 (banker's rounding, not 13) -> range(0, 250, 12): 21 frames
                 [0, 12, 24, 36, 48, 60, 72, 84, 96, 108, 120, 132, 144, 156, 168, 180, 192, 204, 216, 228, 240],
                 id="10s@25-2fps-round-half-even"),
    pytest.param(10, 30, 150, 12, None,
                 # round(30/12) = round(2.5) = 2 (even), not 3
                 [0, 2, 4, 6, 8], id="round-2.5-to-2"),
    pytest.param(100, 25, 150, 1, None,
                 # step 25
                 [0, 25, 50, 75], id="4s@25-1fps"),
    pytest.param(250, 25, 20, 1, 2,
                 # step 25 -> 10; higher = min(20 // 10, 2) = 2 > 1 -> step round(25/2) = round(12.5) = 12
                 # -> 21 frames > 20 -> linspace(0, 249, 20): i * 13.105.. truncated
                 [0, 13, 26, 39, 52, 65, 78, 91, 104, 117, 131, 144, 157, 170, 183, 196, 209, 222, 235, 249],
                 id="10s@25-max2-round-then-linspace"),
    pytest.param(250, 25, 64, 1, 8,
                 # step 25 -> 10; higher = min(64 // 10, 8) = 6 > 1 -> step round(25/6) = round(4.17) = 4
                 # -> range(0, 250, 4) = 63 frames, just under the cap of 64: no linspace
                 list(range(0, 250, 4)), id="10s@25-max8-63-of-64"),
    pytest.param(10, 0.5, 150, 1, None,
                 # a 0.5 fps video asked for 1 fps: round(0.5) = 0 -> clamped to 1 -> every frame
                 [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], id="slow-video-step-clamped"),
    pytest.param(10, 0.5, 4, 1, None,
                 # same, capped: linspace(0, 9, 4) = 0, 3, 6, 9
                 [0, 3, 6, 9], id="slow-video-clamped-then-linspace"),
    pytest.param(1, 30, 150, 1, None, [0], id="one-frame"),
]


@pytest.mark.parametrize("total, fps, max_frames, sample_fps, max_sample_fps, expected", FULLY_LITERAL)
def test_sample_frame_indices_literal(total, fps, max_frames, sample_fps, max_sample_fps, expected):
    got = sample_frame_indices(total, fps, max_frames, sample_fps, max_sample_fps)
    assert got == expected
    assert all(type(i) is int for i in got)  # plain ints (np.int64 would leak into JSON / dict keys)


def test_sample_range_step_literal_check():
    # The one expectation above written as range(0, 250, 4) is spelled out partly here, so it too is literal.
    got = sample_frame_indices(250, 25, 64, 1, 8)
    assert len(got) == 63 and got[:5] == [0, 4, 8, 12, 16] and got[-3:] == [240, 244, 248]


def test_sample_long_video_falls_back_to_linspace():
    # 120 s at 30 fps, 1 fps -> 120 frames > 64 -> linspace(0, 3599, 64): i * 57.127.. truncated
    got = sample_frame_indices(3600, 30, 64, 1)
    assert len(got) == 64
    assert got[:6] == [0, 57, 114, 171, 228, 285]
    assert got[-3:] == [3484, 3541, 3599]  # 61 * 57.127 = 3484.7, 62 * 57.127 = 3541.9, then the end
    assert got == sorted(set(got))


def test_sample_max_sample_fps_not_raised_when_no_room():
    # 120 s at 30 fps, 1 fps -> 120 frames; higher = min(150 // 120, 4) = 1, not > 1: stay at step 30
    got = sample_frame_indices(3600, 30, 150, 1, 4)
    assert len(got) == 120 and got[:3] == [0, 30, 60] and got[-1] == 3570


# ---------------------------------------------------------------------------------------------------------
# load_video on real (synthetic) files
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Written once per module: the 60 s one takes ~0.7 s to encode at 64x48."""
    d = tmp_path_factory.mktemp("videos")
    return {
        "10s30": make_video(d / "10s30.mp4", seconds=10, fps=30),
        "60s30": make_video(d / "60s30.mp4", seconds=60, fps=30),
        "10s25": make_video(d / "10s25.mp4", seconds=10, fps=25),
        "2s30mkv": make_video(d / "2s30.mkv", seconds=2, fps=30),  # Matroska: no frame count in header
        "2s30x264": make_video(d / "2s30x264.mp4", seconds=2, fps=30, codec="libx264"),
    }


def check_frames(clip, size=(64, 48)):
    """Shape/dtype, and each returned frame is the source frame it claims to be: compared with the resized
    synthetic frames around its index, it is closest to its own (catches off-by-one decoding and frames
    that repeat), and consecutive sampled frames differ."""
    n = len(clip.indices)
    assert clip.frames.shape == (n, 384, 384, 3) and clip.frames.dtype == np.uint8
    assert len(clip.timestamps) == n
    for frame, i in zip(clip.frames, clip.indices):
        cands = range(max(0, i - 2), min(clip.total_frames, i + 3))
        dist = {j: np.abs(frame.astype(int) - resize_frame(frame_pixels(j, size)).astype(int)).mean()
                for j in cands}
        assert min(dist, key=dist.get) == i, (i, dist)
    for a, b in zip(clip.frames, clip.frames[1:]):
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_load_10s_1fps(videos):
    clip = load_video(videos["10s30"], max_num_frames=150, sample_fps=1)
    assert clip.indices == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    assert clip.timestamps == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert clip.video_fps == 30.0 and clip.total_frames == 300 and clip.source == videos["10s30"]
    check_frames(clip)


def test_load_10s_max_sample_fps(videos):
    # higher = min(150 // 10, 4) = 4 -> step round(7.5) = 8; timestamps round(8k / 30, 1)
    clip = load_video(videos["10s30"], max_num_frames=150, sample_fps=1, max_sample_fps=4)
    assert len(clip) == 38
    assert clip.indices[:6] == [0, 8, 16, 24, 32, 40] and clip.indices[-1] == 296
    # 0/30, 8/30=0.267, 16/30=0.533, 24/30=0.8, 32/30=1.067, 40/30=1.333, 48/30=1.6, 56/30=1.867 ...
    assert clip.timestamps[:8] == [0.0, 0.3, 0.5, 0.8, 1.1, 1.3, 1.6, 1.9]
    assert clip.timestamps[-1] == 9.9  # 296/30 = 9.867
    check_frames(clip)


def test_load_60s_linspace(videos):
    # 60 frames at 1 fps > 32 -> linspace(0, 1799, 32): i * 58.032.. truncates to 58 * i for i < 31
    clip = load_video(videos["60s30"], max_num_frames=32, sample_fps=1)
    assert clip.indices == [0, 58, 116, 174, 232, 290, 348, 406, 464, 522, 580, 638, 696, 754, 812, 870,
                            928, 986, 1044, 1102, 1160, 1218, 1276, 1334, 1392, 1450, 1508, 1566, 1624,
                            1682, 1740, 1799]
    # round(58 * i / 30, 1); the last is 1799/30 = 59.97 -> 60.0
    assert clip.timestamps == [0.0, 1.9, 3.9, 5.8, 7.7, 9.7, 11.6, 13.5, 15.5, 17.4, 19.3, 21.3, 23.2, 25.1,
                               27.1, 29.0, 30.9, 32.9, 34.8, 36.7, 38.7, 40.6, 42.5, 44.5, 46.4, 48.3, 50.3,
                               52.2, 54.1, 56.1, 58.0, 60.0]
    assert clip.total_frames == 1800
    check_frames(clip)


def test_load_25fps_rounding(videos):
    # step round(25/2) = round(12.5) = 12; timestamps round(12k / 25, 1) = round(0.48k, 1)
    clip = load_video(videos["10s25"], max_num_frames=150, sample_fps=2)
    assert clip.indices == [0, 12, 24, 36, 48, 60, 72, 84, 96, 108, 120, 132, 144, 156, 168, 180, 192, 204,
                            216, 228, 240]
    assert clip.timestamps == [0.0, 0.5, 1.0, 1.4, 1.9, 2.4, 2.9, 3.4, 3.8, 4.3, 4.8, 5.3, 5.8, 6.2, 6.7,
                               7.2, 7.7, 8.2, 8.6, 9.1, 9.6]
    assert clip.video_fps == 25.0 and clip.total_frames == 250
    check_frames(clip)


def test_load_uniform(videos):
    clip = load_video(videos["10s30"], max_num_frames=8, sample_fps=None)
    assert clip.indices == [0, 42, 85, 128, 170, 213, 256, 299]
    # 42/30 = 1.4, 85/30 = 2.83, 128/30 = 4.27, 170/30 = 5.67, 213/30 = 7.1, 256/30 = 8.53, 299/30 = 9.97
    assert clip.timestamps == [0.0, 1.4, 2.8, 4.3, 5.7, 7.1, 8.5, 10.0]
    check_frames(clip)


def test_load_mkv_counts_packets(videos):
    # Matroska records no frame count (stream.frames == 0): the loader counts packets, then rewinds.
    clip = load_video(videos["2s30mkv"], max_num_frames=150, sample_fps=2)
    assert clip.indices == [0, 15, 30, 45] and clip.timestamps == [0.0, 0.5, 1.0, 1.5]
    assert clip.total_frames == 60
    check_frames(clip)


def test_load_libx264(videos):
    clip = load_video(videos["2s30x264"], max_num_frames=150, sample_fps=10)  # step 3
    assert clip.indices == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57]
    assert clip.timestamps == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4,
                               1.5, 1.6, 1.7, 1.8, 1.9]
    check_frames(clip)


def test_load_accepts_pathlike(videos):
    import pathlib
    clip = load_video(pathlib.Path(videos["10s30"]), max_num_frames=4, sample_fps=None)
    assert clip.indices == [0, 99, 199, 299]  # linspace(0, 299, 4) = 0, 99.67, 199.33, 299


def test_truncated_video_keeps_frames_that_exist(tmp_path):
    # A faststart mp4 (index first) cut in half announces 300 frames but holds about half: the loader
    # returns the sampled frames it could decode, with consistent timestamps, instead of failing.
    import av
    from fractions import Fraction
    path = str(tmp_path / "fs.mp4")
    tb = Fraction(1, 30)
    with av.open(path, "w", options={"movflags": "faststart"}) as out:
        s = out.add_stream("mpeg4", rate=30)
        s.width, s.height, s.pix_fmt, s.time_base = 64, 48, "yuv420p", tb
        for n in range(300):
            f = av.VideoFrame.from_ndarray(frame_pixels(n), format="rgb24")
            f.pts, f.time_base = n, tb
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.mp4")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    clip = load_video(cut, max_num_frames=150, sample_fps=1)
    full = [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    assert 1 <= len(clip) < len(full)
    assert clip.indices == full[: len(clip)]
    assert clip.timestamps == [float(k) for k in range(len(clip))]
    check_frames(clip)


# ---------------------------------------------------------------------------------------------------------
# Stills: one image, a folder, lists of arrays / PIL images, grey padding
# ---------------------------------------------------------------------------------------------------------

def solid(colour, size=(32, 32)):
    return Image.new("RGB", size, colour)


def test_single_image_path(tmp_path):
    p = tmp_path / "a.png"
    solid((200, 10, 10)).save(p)
    clip = load_video(str(p))
    assert clip.frames.shape == (1, 384, 384, 3) and clip.frames.dtype == np.uint8
    assert clip.timestamps == [0.0]
    assert tuple(clip.frames[0, 192, 192]) == (200, 10, 10)


def test_image_folder(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for k, c in enumerate(colours):
        solid(c).save(tmp_path / f"f{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")  # ignored: not an image extension
    clip = load_video(str(tmp_path))
    assert clip.frames.shape == (3, 384, 384, 3)
    assert clip.timestamps == [0.0, 1.0, 2.0]
    # sorted by name, so frame k is colour k
    assert [tuple(clip.frames[k, 192, 192]) for k in range(3)] == colours


def test_list_of_arrays_and_pil_images():
    arrays = [np.full((20, 20, 3), v, dtype=np.uint8) for v in (10, 200)]
    clip = load_video(arrays)
    assert clip.frames.shape == (2, 384, 384, 3) and clip.timestamps == [0.0, 1.0]
    assert clip.frames[0, 100, 100, 0] == 10 and clip.frames[1, 100, 100, 0] == 200

    pils = [solid((1, 2, 3)), solid((4, 5, 6)).convert("L"), solid((7, 8, 9)).convert("RGBA")]
    clip = load_video(pils)
    assert clip.frames.shape == (3, 384, 384, 3) and clip.timestamps == [0.0, 1.0, 2.0]
    assert tuple(clip.frames[0, 192, 192]) == (1, 2, 3)


@pytest.mark.parametrize("size", [(40, 20), (20, 40)], ids=["wide", "tall"])
def test_non_square_padded_with_grey(size):
    # 40x20 red -> 40x40 with grey bands top and bottom (tall: left and right), then 384x384.
    # The corner is far from the red/grey edge, so bicubic leaves it exactly the padding grey.
    clip = load_video([solid((255, 0, 0), size)])
    out = clip.frames[0]
    for y, x in [(0, 0), (383, 383), (0, 383), (383, 0)]:
        assert np.abs(out[y, x].astype(int) - 127).max() <= 1, (y, x, out[y, x])
    assert tuple(out[192, 192]) == (255, 0, 0)


def test_too_many_images_subsampled():
    arrays = [np.full((8, 8, 3), v, dtype=np.uint8) for v in range(10)]
    clip = load_video(arrays, max_num_frames=4)  # linspace(0, 9, 4) = images 0, 3, 6, 9
    assert len(clip) == 4 and [int(f[0, 0, 0]) for f in clip.frames] == [0, 3, 6, 9]


# ---------------------------------------------------------------------------------------------------------
# Bad input: always VideoXLError with a message that says what is wrong
# ---------------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(VideoXLError, match="video not found"):
        load_video(str(tmp_path / "nope.mp4"))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(VideoXLError, match="empty"):
        load_video(str(p))


@pytest.mark.parametrize("maker", [make_text_file, make_corrupt_video], ids=["text", "garbage"])
def test_unreadable_file(tmp_path, maker):
    path = maker(tmp_path / "bad.mp4")
    with pytest.raises(VideoXLError, match="not a readable video|corrupt"):
        load_video(path)


def test_header_only_video(tmp_path, videos):
    # A real mp4 cut to its first 300 bytes: the index (at the end for a non-faststart file) is gone.
    with open(videos["10s30"], "rb") as f:
        head = f.read(300)
    p = tmp_path / "head.mp4"
    p.write_bytes(head)
    with pytest.raises(VideoXLError, match="not a readable video|corrupt"):
        load_video(str(p))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_bad_max_num_frames(tmp_path, bad):
    # Checked before the path is even looked at, so a missing file does not hide the settings error.
    with pytest.raises(VideoXLError, match="must be a positive"):
        load_video(str(tmp_path / "whatever.mp4"), max_num_frames=bad)


@pytest.mark.parametrize("bad", [0, -1, "x", False])
def test_bad_sample_fps(tmp_path, bad):
    with pytest.raises(VideoXLError, match="must be a positive"):
        load_video(str(tmp_path / "whatever.mp4"), sample_fps=bad)


@pytest.mark.parametrize("bad", [0, -2.0, "4"])
def test_bad_max_sample_fps(tmp_path, bad):
    with pytest.raises(VideoXLError, match="must be a positive"):
        load_video(str(tmp_path / "whatever.mp4"), max_sample_fps=bad)


def test_nan_sample_fps_rejected(videos):
    with pytest.raises(VideoXLError, match="must be a positive"):
        load_video(videos["10s30"], sample_fps=float("nan"))


def test_bad_decoder(videos):
    with pytest.raises(VideoXLError, match="decoder must be"):
        load_video(videos["10s30"], decoder="opencv")


def test_decord_missing_is_explained(videos):
    try:
        import decord  # noqa: F401
        pytest.skip("decord is installed here")
    except ImportError:
        pass
    with pytest.raises(VideoXLError, match="not installed"):
        load_video(videos["10s30"], decoder="decord")


def test_bad_images(tmp_path):
    with pytest.raises(VideoXLError, match="no images given"):
        load_video([])
    with pytest.raises(VideoXLError, match="HxWx3"):
        load_video([np.zeros((4, 4), dtype=np.uint8)])
    with pytest.raises(VideoXLError, match="unsupported image type"):
        load_video([42])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(VideoXLError, match="folder holds no images"):
        load_video(str(tmp_path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(VideoXLError, match="cannot read image"):
        load_video(str(broken))
