"""A replica in a process of its own (serving/remote.py): the same answers as the model in this process, errors
as the same exceptions, a cancellation that reaches the child mid-question, and a load failure as one line."""
import time

import pytest

from videoxl.cancel import Cancel, Cancelled, TimedOut
from videoxl.errors import VideoXLError
from videoxl.serving.remote import RemoteModel

GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def remote(tiny_dir):
    r = RemoteModel(dict(model_dir=tiny_dir, device="cpu", dtype="float32"))
    r.wait_ready()
    yield r
    r.close()
    assert not r.alive()


def test_answers_as_the_model_here(remote, tiny, clip_path):
    model, tok = tiny
    want = "".join(model.stream_chat(clip_path, tok, "What happens?", max_num_frames=8, generation_config=GEN))
    got = "".join(remote.stream_chat(clip_path, None, "What happens?", max_num_frames=8, generation_config=GEN))
    assert got == want
    assert remote.last_stats["generated_tokens"] == model.last_stats["generated_tokens"]
    assert remote.gauges["videoxl_kv_cache_entries"] == 1


def test_errors_come_back_as_their_exceptions_and_it_goes_on(remote, clip_path):
    with pytest.raises(VideoXLError, match="video not found"):
        list(remote.stream_chat("/nonexistent/v.mp4", None, "What?", generation_config=GEN))
    with pytest.raises(TimedOut):
        list(remote.stream_chat(clip_path, None, "What?", max_num_frames=8, generation_config=GEN,
                                cancel=Cancel(deadline=time.monotonic() - 1)))
    assert "".join(remote.stream_chat(clip_path, None, "Again?", max_num_frames=8, generation_config=GEN))


def test_a_cancel_reaches_the_child(remote, tmp_path):
    from videoxl.checkpoint.tiny import make_demo_video

    video = make_demo_video(str(tmp_path / "long.mp4"), seconds=60.0, fps=10, size=(64, 48))
    cancel = Cancel()
    stream = remote.stream_chat(video, None, "What?", max_num_frames=64, generation_config={"max_new_tokens": 200},
                                cancel=cancel)
    cancel.set()  # before the child has even decoded the frames
    with pytest.raises(Cancelled):
        list(stream)
    assert remote.alive()


def test_closing_the_stream_early_leaves_the_pipe_in_step(remote, clip_path):
    stream = remote.stream_chat(clip_path, None, "First?", max_num_frames=8, generation_config={"max_new_tokens": 30})
    next(stream, None)
    stream.close()  # as the engine does at a stop string
    assert "".join(remote.stream_chat(clip_path, None, "Next?", max_num_frames=8, generation_config=GEN))


def test_a_load_failure_is_one_line(tmp_path):
    r = RemoteModel(dict(model_dir=str(tmp_path / "missing"), device="cpu"))
    with pytest.raises(VideoXLError, match="could not load the model: checkpoint folder not found") as e:
        r.wait_ready()
    assert "\n" not in str(e.value)
    r.close()


def test_a_child_that_dies_fails_its_question_and_reads_as_down(tiny_dir, clip_path):
    r = RemoteModel(dict(model_dir=tiny_dir, device="cpu", dtype="float32"))
    r.wait_ready()
    r.process.kill()
    r.process.join(timeout=10)
    assert not r.alive()
    with pytest.raises(RuntimeError, match="worker process on cpu exited"):
        list(r.stream_chat(clip_path, None, "What?", max_num_frames=8, generation_config=GEN))
    r.close()
