"""CPU decoders and NVDEC sessions taking runs of jobs from one queue in frame order (video/decode.JobReader), and
decoder='both'. The `files` fixture is test_video_decode's."""
import threading

import av
import numpy as np
import pytest
import torch

from tests.test_video_decode import files  # noqa: F401 - the fixture
from videoxl.errors import VideoXLError
from videoxl.video.sources import load_video, open_video


def test_decoders_take_runs_in_frame_order_from_one_queue(files, monkeypatch):
    """Each decoder takes the next run when it is free, so frames arrive in order at the speed of all of them
    (fixed shares would deliver the first share alone, at one decoder's speed, before the others')."""
    import videoxl.video.decode as decode

    handed, real, lock = [], decode.decode_jobs, threading.Lock()

    def spy(probe, next_run, *a, **k):
        def logged():
            with lock:  # taken and logged in one step
                run = next_run()
                if run is not None:
                    handed.append(run[0].start)
            return run
        return real(probe, logged, *a, **k)

    monkeypatch.setattr(decode, "decode_jobs", spy)
    stream = open_video(files["x264-gop30"], max_num_frames=40, sample_fps=None, workers=3)
    assert sum(len(b) for b in stream.batches(8)) == 40
    assert handed == sorted(handed) and len(handed) > 3 and stream.stats["video_workers"] == 3


def test_both_decoders_share_the_queue_and_give_each_frame_exactly(files, monkeypatch):
    """decoder='both' on the CPU, NVDEC stood in for by a CPU decoder whose frames come back as tensors: the
    frames equal the CPU path's, and every packet fed is counted under one of the two kinds."""
    import videoxl.video.gpu as gpu
    import videoxl.video.read as read
    from videoxl.video.decode import cpu_convert

    monkeypatch.setattr(read, "_nvdec", lambda info, device: ("stand-in", None))
    monkeypatch.setattr(gpu, "open_nvdec", lambda path, accel, device: av.open(path))
    monkeypatch.setattr(gpu, "nvdec_convert", lambda turns, device: lambda f: torch.tensor(cpu_convert(turns)(f)))
    monkeypatch.setattr(read, "on_device", lambda convert, device: lambda f: torch.tensor(convert(f)))
    cpu = open_video(files["x264-gop30"], max_num_frames=40, sample_fps=None, decoder="pyav")
    want = np.concatenate(list(cpu.batches(8)))
    both = open_video(files["x264-gop30"], max_num_frames=40, sample_fps=None, decoder="both", device="cuda:0",
                      workers=2)
    got = torch.cat(list(both.batches(8))).numpy()
    s = both.stats
    assert np.array_equal(got, want) and both.kept == cpu.kept and s["video_decoder"] == "nvdec+pyav"
    assert set(s["video_packets_by_decoder"]) == {"nvdec", "pyav"}
    assert sum(s["video_packets_by_decoder"].values()) == s["video_frames_read"] == cpu.stats["video_frames_read"]


def test_both_decoders_without_nvdec_is_one_clear_line(files):
    with pytest.raises(VideoXLError, match="decoder 'both' is not available: frames are wanted on cpu"):
        load_video(files["x264-gop30"], max_num_frames=4, decoder="both", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_both_decoders_on_a_gpu_give_the_cpu_frames_within_nvdec_bound(files):
    from videoxl.video.gpu import nvdec_accel

    if nvdec_accel(torch.device("cuda"))[0] is None:
        pytest.skip("this PyAV has no NVDEC")
    cpu = open_video(files["x264-gop30"], max_num_frames=60, sample_fps=None, decoder="pyav")
    want = np.concatenate(list(cpu.batches(16))).astype(np.int16)
    both = open_video(files["x264-gop30"], max_num_frames=60, sample_fps=None, decoder="both", device="cuda")
    got = torch.cat(list(both.batches(16))).cpu().numpy().astype(np.int16)
    assert both.kept == cpu.kept and np.abs(got - want).max() <= 3  # NVDEC's RGB: within 3 levels of FFmpeg's
    assert sum(both.stats["video_packets_by_decoder"].values()) == cpu.stats["video_frames_read"]
