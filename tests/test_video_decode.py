"""Tests of the fast decoding paths (video_index, video_decode, video_read, video_gpu) on the CPU.

The reference for every path is a full sequential decode with plain PyAV (every frame, in order), converted
the way the reference's processor does (FFmpeg RGB, PIL bicubic): the frames a path returns must be equal,
pixel for pixel, to that decode's frames at the sampled numbers. Files are tiny (64x48) and written here.
"""
from __future__ import annotations

import functools
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from tests.media import frame_pixels
from videoxl.errors import VideoXLError
from videoxl.video.sources import load_video, open_video, resize_frame, sample_frame_indices
from videoxl.video.gpu import nv12_to_model_input, resize_exact, yuv_to_rgb


def write(path, codec="libx264", frames=600, size=(64, 48), pts_ms=None, options=None, rate=30) -> str:
    path = str(path)
    with av.open(path, "w") as out:
        s = out.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        tb = Fraction(1, 1000) if pts_ms is not None else Fraction(1, rate)
        s.time_base = tb
        if pts_ms is not None:
            s.codec_context.time_base = tb
        s.options = options or {}
        for n in range(frames):
            f = av.VideoFrame.from_ndarray(frame_pixels(n, size), format="rgb24")
            f.pts, f.time_base = (pts_ms[n] if pts_ms is not None else n), tb
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return path


@functools.lru_cache(maxsize=8)
def sequential(path) -> list[np.ndarray]:
    """Every frame of a plain, single-threaded, in-order decode, as full-size RGB."""
    with av.open(str(path)) as c:
        c.streams.video[0].thread_count = 1
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("decode")
    return {
        # x264 defaults: keyint 250, bframes 3 with B-pyramid (about half the frames are never referenced)
        "x264": write(d / "x264.mp4"),
        "x264-gop30": write(d / "gop30.mp4", options={"x264-params": "keyint=30:min-keyint=30:scenecut=0:bframes=3"}),
        "x264-open": write(d / "open.mp4", frames=300, options={"x264-params": "keyint=40:bframes=3:open-gop=1"}),
        "hevc": write(d / "hevc.mp4", "libx265", frames=150,
                      options={"x265-params": "keyint=30:min-keyint=30:log-level=error"}),  # open GOP (CRA)
        "vp9": write(d / "vp9.webm", "libvpx-vp9", frames=120, options={"g": "30"}),
    }


def expected(full, indices):
    return np.stack([resize_frame(full[i]) for i in indices])


PATHS = [pytest.param(dict(decoder="pyav", workers=1), id="one-decoder"),
         pytest.param(dict(decoder="pyav", workers=3), id="three-decoders")]
SAMPLINGS = [pytest.param(dict(sample_fps=1), id="1fps"),
             pytest.param(dict(sample_fps=None, max_num_frames=2048), id="uniform-all"),
             pytest.param(dict(sample_fps=None, max_num_frames=7), id="uniform-7"),
             pytest.param(dict(sample_fps=2, max_sample_fps=8, max_num_frames=64), id="max-sample-fps")]


@pytest.fixture
def no_resize(monkeypatch):
    """Frames come back at their decoded size (the resize is the same PIL call on both sides; leaving it out
    keeps this matrix of cases fast and compares the decoded pixels themselves)."""
    from videoxl.video import read as video_read

    monkeypatch.setattr(video_read, "cpu_convert", lambda turns: lambda f: f.to_ndarray(format="rgb24"))


@pytest.mark.parametrize("name", ["x264", "x264-gop30", "x264-open", "hevc", "vp9"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("path", PATHS)
def test_frames_equal_full_sequential_decode(files, name, sampling, path, no_resize):
    full = sequential(files[name])
    stream = open_video(files[name], **sampling, **path)
    frames = np.concatenate(list(stream.batches(32)))
    settings = dict(max_num_frames=150, sample_fps=1, max_sample_fps=None) | sampling
    indices = sample_frame_indices(len(full), 30.0, settings["max_num_frames"], settings["sample_fps"],
                                   settings["max_sample_fps"])
    assert stream.kept == indices
    np.testing.assert_array_equal(frames, np.stack([full[i] for i in indices]))


@pytest.mark.parametrize("path", PATHS + [pytest.param(dict(), id="auto")])
def test_model_input_equals_full_decode_resized(files, path):
    full = sequential(files["x264"])
    clip = load_video(files["x264"], max_num_frames=9, sample_fps=None, **path)
    assert clip.indices == [0, 74, 149, 224, 299, 374, 449, 524, 599]  # linspace(0, 599, 9) = 74.875 k
    np.testing.assert_array_equal(clip.frames, expected(full, clip.indices))


def test_sparse_sampling_reads_fewer_frames(files):
    stream = open_video(files["x264-gop30"], max_num_frames=4, sample_fps=None, workers=2)
    list(stream.batches(8))
    s = stream.stats
    assert s["video_decoder"] == "pyav" and s["video_workers"] == 2 and s["video_frames_total"] == 600
    # 4 frames in 4 of 20 GOPs: at most 4 GOPs' worth of packets, fewer since unreferenced B-frames are skipped
    assert 4 <= s["video_frames_read"] < 4 * 30
    assert s["video_decode_s"] > 0 and s["video_frames_missing"] == 0 and s["video_mode"] == "exact"


def test_disposable_frames_skipped_on_long_gop(files):
    stream = open_video(files["x264"], max_num_frames=150, sample_fps=1, workers=1)
    list(stream.batches(8))
    # frames 0..570 are needed; the unreferenced B-frames among 600 are left undecoded
    assert stream.stats["video_frames_read"] < 500


def test_keyframes_mode(files):
    full = sequential(files["x264-gop30"])
    clip = load_video(files["x264-gop30"], max_num_frames=10, sample_fps=None, mode="keyframes")
    # linspace(0, 599, 10) = 0, 66, 133, 199, 266, 332, 399, 465, 532, 599; keyframes every 30 frames:
    # nearest 0, 60, 120, 210, 270, 330, 390, 450 (465 is 15 from 450 and 480: the earlier wins), 540, and 570
    # for 599 (600 would be past the end)
    assert clip.indices == [0, 60, 120, 210, 270, 330, 390, 450, 540, 570]
    np.testing.assert_array_equal(clip.frames, expected(full, clip.indices))
    stream = open_video(files["x264-gop30"], max_num_frames=10, sample_fps=None, mode="keyframes")
    list(stream.batches(16))
    assert stream.stats["video_approx_max_error_s"] == pytest.approx(29 / 30, abs=1e-3)  # 599 -> 570


def test_variable_frame_rate(tmp_path):
    # 100 ms after every 10th frame, 33 ms otherwise
    gaps = [100 if n % 10 == 0 else 33 for n in range(59)]
    pts = [0] + list(np.cumsum(gaps))
    path = write(tmp_path / "vfr.mp4", frames=60, pts_ms=pts)
    full = sequential(path)
    stream = open_video(path, max_num_frames=150, sample_fps=1)
    frames = np.concatenate(list(stream.batches(8)))
    fps = stream.video_fps  # average rate: 60 frames over the file's duration
    step = round(fps / 1)
    assert stream.kept == list(range(0, 60, step))
    np.testing.assert_array_equal(frames, expected(full, stream.kept))
    # timestamps are the frames' real times (the reference would print number / average rate)
    assert stream.stats["video_vfr"] is True
    assert stream.timestamps == [round(pts[k] / 1000, 1) for k in stream.kept]
    assert stream.timestamps != [round(k / fps, 1) for k in stream.kept]


def set_display_matrix(path, matrix) -> str:
    data = bytearray(open(path, "rb").read())
    i = data.find(b"tkhd")
    assert data[i + 4] == 0  # version 0 layout
    offset = i + 4 + 4 + 20 + 8 + 8  # version/flags, times/track/reserved/duration, reserved, layer..volume
    data[offset:offset + 36] = b"".join(struct.pack(">i", v) for v in matrix)
    out = path.replace(".mp4", "-rot.mp4")
    open(out, "wb").write(data)
    return out


def test_rotation_tag_applied(files):
    # QuickTime's matrix for a clip shot in portrait: show it turned 90 degrees clockwise (FFmpeg: -90)
    path = set_display_matrix(files["x264-gop30"], [0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000])
    full = sequential(files["x264-gop30"])
    clip = load_video(path, max_num_frames=5, sample_fps=None)
    upright = [np.rot90(full[i], -1) for i in clip.indices]
    np.testing.assert_array_equal(clip.frames, np.stack([resize_frame(f) for f in upright]))
    # turned clockwise: the source's left edge is now the top; red grows with x in the source, so with y here
    assert upright[0].shape == (64, 48, 3)
    red = upright[0][..., 0].astype(int)
    assert red[4:20, 10].mean() < red[44:60, 10].mean()


def test_rotation_not_quarter_turn_refused(files):
    c = 46341  # cos 45 degrees in 16.16
    path = set_display_matrix(files["x264-gop30"], [c, c, 0, -c, c, 0, 0, 0, 0x40000000])
    with pytest.raises(VideoXLError, match="rotation of -?45 degrees"):
        load_video(path, max_num_frames=4)


def damage(path, frame_numbers) -> str:
    """Overwrite the middle of the packets of the given frames with seeded garbage."""
    with av.open(path) as c:
        s = c.streams.video[0]
        packets = sorted(((p.pts, p.pos, p.size) for p in c.demux(s) if p.size), key=lambda t: t[0])
    data = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(0)
    for k in frame_numbers:
        _, pos, size = packets[k]
        data[pos + 8:pos + size] = rng.integers(0, 256, size - 8, dtype=np.uint8).tobytes()
    out = path.replace(".mp4", "-damaged.mp4")
    open(out, "wb").write(data)
    return out


@pytest.mark.parametrize("workers", [1, 3])
def test_corrupt_middle_is_an_error_or_a_reported_skip(files, workers):
    clean = sequential(files["x264-gop30"])
    path = damage(files["x264-gop30"], [300, 301, 303])  # keyframe 300 and frames after it
    with pytest.raises(VideoXLError, match="corrupt video: frame .* could not be decoded cleanly"):
        load_video(path, max_num_frames=60, sample_fps=None, workers=workers)
    stream = open_video(path, max_num_frames=60, sample_fps=None, workers=workers, on_damage="skip")
    frames = np.concatenate(list(stream.batches(16)))
    planned = sample_frame_indices(600, 30.0, 60, None)
    assert stream.stats["video_frames_skipped"] > 0
    assert len(stream.kept) == len(planned) - stream.stats["video_frames_skipped"]
    assert all(not 300 <= k < 330 for k in stream.kept) and stream.kept[-1] == 599
    # never a wrong frame: everything returned is the clean file's frame
    np.testing.assert_array_equal(frames, expected(clean, stream.kept))


def test_bad_options(files):
    with pytest.raises(VideoXLError, match="mode must be"):
        load_video(files["x264"], mode="fast")
    with pytest.raises(VideoXLError, match="workers must be"):
        load_video(files["x264"], workers=0)
    with pytest.raises(VideoXLError, match="on_damage must be"):
        load_video(files["x264"], on_damage="ignore")
    with pytest.raises(VideoXLError, match="decoder 'nvdec' is not available"):
        load_video(files["x264"], decoder="nvdec", device="cpu")
    with pytest.raises(VideoXLError, match="video must be a path"):
        load_video(42)


# ---------------------------------------------------------------------------------------------------------
# The GPU path's pixel arithmetic, run on the CPU
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1080, 1920), (720, 1280), (48, 64), (384, 384), (300, 200)])
def test_torch_resize_equals_pil(shape):
    rng = np.random.default_rng(sum(shape))
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    smooth = np.stack([(xs * 7 + ys * 3) % 256, (xs * ys) % 256, (ys * 5) % 256], -1)
    for img in (rng.integers(0, 256, (*shape, 3)), smooth):
        img = img.astype(np.uint8)
        np.testing.assert_array_equal(resize_exact(torch.from_numpy(img)).numpy(), resize_frame(img))


def test_torch_colour_conversion_within_three_levels_of_ffmpeg():
    """NVDEC hands over the same YUV as the CPU decoder; only the RGB conversion differs from FFmpeg's
    fixed-point one: at most 3 levels (2 on random planes), about 0.2 on average, before and after the resize."""
    g = av.filter.Graph()
    src = g.add("testsrc2", "size=640x360:rate=30:duration=1")
    src.link_to(g.add("buffersink"))
    g.configure()
    frame = g.pull().reformat(format="yuv420p")
    y, u, v = [np.frombuffer(bytes(p), np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes]
    ours = yuv_to_rgb(*(torch.from_numpy(a.copy()) for a in (y, u, v)), frame.colorspace, frame.color_range == 2)
    ffmpeg = frame.to_ndarray(format="rgb24")
    diff = np.abs(ours.numpy().astype(int) - ffmpeg)
    assert diff.max() <= 3 and diff.mean() < 0.4
    resized = np.abs(resize_exact(ours).numpy().astype(int) - resize_frame(ffmpeg))
    assert resized.max() <= 3 and resized.mean() < 0.4


def test_nv12_frame_path_on_cpu_frames(files):
    """The NVDEC converter's plane handling (DLPack export of NV12, as NVDEC hands frames over), on CPU frames
    of the same decode: within the colour conversion's few levels of the CPU path."""
    with av.open(files["x264"]) as c:
        for n, frame in enumerate(c.decode(video=0)):
            if n == 37:
                break
    ours = nv12_to_model_input(frame.reformat(format="nv12"), 0).numpy()
    ref = resize_frame(frame.to_ndarray(format="rgb24"))
    diff = np.abs(ours.astype(int) - ref)
    assert ours.shape == (384, 384, 3) and diff.max() <= 3 and diff.mean() < 0.4


def test_raw_h264_without_timestamps_decoded_in_order(tmp_path, files):
    """An Annex B elementary stream has no packet timestamps: frames are counted in one sequential decode."""
    raw = write(tmp_path / "raw.h264", frames=90, options={"x264-params": "keyint=30:scenecut=0"})
    with av.open(raw) as c:
        assert all(p.pts is None for p in c.demux(video=0) if p.size)  # what the test is about
    full = sequential(raw)
    stream = open_video(raw, max_num_frames=6, sample_fps=None)
    frames = np.concatenate(list(stream.batches(4)))
    assert stream.stats["video_decoder"] == "pyav-sequential"
    np.testing.assert_array_equal(frames, expected(full, stream.kept))
    assert stream.kept == sample_frame_indices(len(full), stream.video_fps, 6, None)


def test_nv12_path_turns_frames_like_the_cpu_path(files):
    with av.open(files["x264"]) as c:
        frame = next(iter(c.decode(video=0)))
    ours = nv12_to_model_input(frame.reformat(format="nv12"), 3).numpy()  # a -90 degree tag: clockwise
    ref = resize_frame(np.rot90(frame.to_ndarray(format="rgb24"), 3))
    assert np.abs(ours.astype(int) - ref).max() <= 3



def test_cpu_decoders_beside_nvdec_leave_cores_to_the_sessions():
    """'both': 14 CPU decoders on 32 cores (the best measured there), fewer on 16 (where 14 starved NVDEC and the
    vision tower), at least one; never more than half the cores."""
    from videoxl.video.read import cpu_beside

    assert cpu_beside(32) == 14 and cpu_beside(64) == 14
    assert cpu_beside(16) == 6 and cpu_beside(2) == 1
    assert all(cpu_beside(c) <= max(1, c // 2) for c in range(1, 129))
