"""Frames decoded while the weights load (videoxl.video.prefetch): the question gets exactly the frames and
timestamps it would have decoded itself, in the batch size it asks for."""
import numpy as np
import pytest

from videoxl.errors import VideoXLError
from videoxl.video.prefetch import Prefetch, take
from videoxl.video.sources import open_video

SAMPLING = (40, None, None)  # 40 frames spread over the clip


def read_all(stream, size):
    batches = list(stream.batches(size))
    return batches, np.concatenate(batches), list(stream.kept), stream.timestamps


@pytest.mark.parametrize("size,ahead", [(7, 1024), (96, 1024), (5, 3)])
def test_prefetched_frames_equal_a_direct_decode(clip_path, size, ahead):
    _, direct, kept, stamps = read_all(open_video(clip_path, *SAMPLING), size)
    pre = Prefetch(clip_path, SAMPLING, ahead=ahead)
    batches, got, got_kept, got_stamps = read_all(pre.frame_stream(), size)
    assert np.array_equal(got, direct) and got_kept == kept and got_stamps == stamps
    assert [len(b) for b in batches[:-1]] == [size] * (len(batches) - 1) and 0 < len(batches[-1]) <= size


class Model:
    prefetched = None


def test_take_hands_over_only_a_matching_prefetch(clip_path, tmp_path):
    model = Model()
    assert take(model, clip_path, SAMPLING) is None
    model.prefetched = Prefetch(clip_path, SAMPLING)
    assert take(model, clip_path, (8, 1, None)) is None and model.prefetched is None  # other sampling: dropped
    model.prefetched = Prefetch(clip_path, SAMPLING)
    assert take(model, clip_path, SAMPLING) is not None and model.prefetched is None
    model.prefetched = Prefetch(str(tmp_path / "missing.mp4"), SAMPLING)
    with pytest.raises(VideoXLError, match="not found"):
        take(model, str(tmp_path / "missing.mp4"), SAMPLING)


def test_chat_on_the_command_line_answers_from_the_prefetched_frames(tiny_dir, clip_path, capsys, monkeypatch):
    import json

    import videoxl
    import videoxl.pipeline as pipeline
    from videoxl.cli.main import main

    model, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32")
    direct = model.chat(clip_path, tok, "q", max_num_frames=16, sample_fps=1,
                        generation_config={"do_sample": False, "max_new_tokens": 4})

    def no_second_decode(*a, **k):
        raise AssertionError("the question decoded the video again")

    monkeypatch.setattr(pipeline, "open_video", no_second_decode)
    assert main(["chat", clip_path, "q", "--model", tiny_dir, "--max-num-frames", "16", "--max-new-tokens", "4",
                 "--no-progress", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["answer"] == direct and line["stats"]["frames"] == model.last_stats["frames"]
