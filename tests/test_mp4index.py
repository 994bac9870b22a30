"""The packet index read from an MP4's sample tables (video/mp4index.py) against the full demux scan
(video/index.probe) it replaces: the same pts, dts, keyframes and frame order, packet for packet, and the same
disposable frames once the decoders read them from the packets; files it cannot trust fall back to the scan."""
import av
import numpy as np
import pytest

from tests.media import make_video
from videoxl.video.index import probe
from videoxl.video.mp4index import NotParsed, mp4_index, scan


def h264_with_bframes(path, faststart=False) -> str:
    """libx264 with B-frames (reordered pts, an edit list) and short GOPs: what the tables must get right."""
    return make_video(path, 3.0, codec="libx264", codec_options={"preset": "veryfast", "bf": "2", "g": "12",
                                                                 "keyint_min": "12"}, faststart=faststart)


def both(path):
    with av.open(path) as c:
        full = probe(c, path)
    with av.open(path) as c:
        fast = mp4_index(path, c, c.streams.video[0])
    return full, fast


@pytest.mark.parametrize("kind", ["h264-bframes", "h264-faststart", "mpeg4", "h264-ultrafast"])
def test_tables_give_the_scan_index(tmp_path, kind):
    path = {"h264-bframes": lambda p: h264_with_bframes(p),
            "h264-faststart": lambda p: h264_with_bframes(p, faststart=True),
            "mpeg4": lambda p: make_video(p, 3.0),
            "h264-ultrafast": lambda p: make_video(p, 3.0, codec="libx264")}[kind](tmp_path / "v.mp4")
    full, fast = both(path)
    for field in ("pts", "dts", "key", "frame_of", "packet_of"):
        assert np.array_equal(getattr(full.index, field), getattr(fast, field)), field
    assert fast.disposable is None
    with av.open(path) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
    read = np.array([fast.is_disposable(i, p) for i, p in enumerate(packets)])
    assert np.array_equal(read, full.index.disposable)
    if kind == "h264-bframes":
        assert read.any() and not full.index.pts.tolist() == sorted(full.index.pts.tolist())  # B-frames: reordered


def test_other_containers_fall_back_to_the_scan(tmp_path):
    path = make_video(tmp_path / "v.mkv", 2.0)
    with av.open(path) as c, pytest.raises(NotParsed):
        mp4_index(path, c, c.streams.video[0])
    with av.open(path) as c:
        header = probe(c, path, header_only=True)
    info = scan(path, header)  # the scan, as before
    assert info.index is not None and info.index.disposable is not None


def test_tables_that_disagree_with_ffmpeg_fall_back_to_the_scan(tmp_path, monkeypatch):
    """A misread table (here one pts off among the first packets) is caught against FFmpeg's own packets."""
    from videoxl.video import mp4index

    path = h264_with_bframes(tmp_path / "v.mp4")
    right = mp4index.sample_tables

    def off_by_one(moov):
        dts, pts, key, sizes = right(moov)
        pts = pts.copy()
        pts[3] += 1
        return dts, pts, key, sizes

    monkeypatch.setattr(mp4index, "sample_tables", off_by_one)
    with av.open(path) as c, pytest.raises(NotParsed, match="packet 3"):
        mp4_index(path, c, c.streams.video[0])
    with av.open(path) as c:
        header = probe(c, path, header_only=True)
    info = scan(path, header)
    assert info.index is not None and info.index.disposable is not None  # the full scan's index
    with av.open(path) as c:
        assert np.array_equal(info.index.pts, probe(c, path).index.pts)
