"""What a new user passes to the Python API first: every wrong type is one VideoXLError line, natural inputs
(frame arrays, float images, numpy numbers, bytes paths) are accepted, and the answer says what it rests on."""
import os
import warnings

import numpy as np
import pytest
import torch

import videoxl
from videoxl.errors import VideoXLMemoryError, VideoXLWarning

GREEDY = {"do_sample": False, "max_new_tokens": 6}


def ask(model, tokenizer, video, **kw):
    kw.setdefault("generation_config", GREEDY)
    return model.chat(video, tokenizer, "What?", **kw)


def frames_u8(n=5, h=40, w=60):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("video, message", [
    (None, "video_path is None: give a video file, an image, a folder of images, or a list of images"),
    (5, "video_path must be a video file, an image, a folder of images, or a list of images / HxWx3 frames; "
        "got a int"),
    (torch.zeros(3), r"a video array must be [T, H, W, 3] frames or one [H, W, 3] image, got shape [3]"),
    (np.zeros((2, 3, 8, 8), dtype=np.uint8), "frame 0 must be an HxWx3 RGB array (channels last: HxWx3, not "
                                              "3xHxW), got shape [3, 8, 8]"),
    (b"\x00\x01" * 3000, "video_path is 6000 bytes of data, not a path: write them to a file and pass its path"),
    ("", "video_path is an empty string"),
    ([], "video_path is an empty list"),
    ([np.zeros((8, 8, 3), dtype=np.uint8), 7], "video_path[1] is a int: list items must be image paths"),
    (np.full((8, 8, 3), 200.0, dtype=np.float32), "image: float pixel values must be in [0, 1], got [200, 200] "
                                                   "(pass uint8 for 0..255)"),
    (np.full((8, 8, 3), 300, dtype=np.int64), "image: integer pixel values must be in 0..255, got [300, 300]"),
    (np.zeros((8, 8, 3), dtype=bool), "image: pixel type bool is not supported"),
])
def test_bad_video_inputs_are_one_line(tiny, video, message):
    model, tokenizer = tiny
    with pytest.raises(videoxl.VideoXLError) as e:
        ask(model, tokenizer, video)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_frame_array_tensor_and_list_agree(tiny):
    """A [T, H, W, 3] uint8 array (or tensor) is T frames: the same answer as the list of its frames."""
    model, tokenizer = tiny
    frames = frames_u8()
    as_list = ask(model, tokenizer, list(frames))
    assert ask(model, tokenizer, frames) == as_list and model.last_stats["frames"] == 5
    assert ask(model, tokenizer, torch.from_numpy(frames)) == as_list


def test_float_frames_in_0_1_are_scaled_not_black(tiny):
    model, tokenizer = tiny
    frames = frames_u8()
    expected = ask(model, tokenizer, frames)
    black = ask(model, tokenizer, np.zeros_like(frames))
    assert ask(model, tokenizer, frames.astype(np.float32) / 255.0) == expected != black
    assert ask(model, tokenizer, torch.from_numpy(frames).to(torch.bfloat16) / 255.0) is not None


def test_bytes_path_and_numpy_numbers_are_accepted(tiny, clip_path):
    model, tokenizer = tiny
    expected = ask(model, tokenizer, clip_path, max_num_frames=16, sample_fps=1)
    assert ask(model, tokenizer, os.fsencode(clip_path), max_num_frames=np.int64(16),
               sample_fps=np.float32(1.0)) == expected
    assert model.last_stats["frames"] == 6


@pytest.mark.parametrize("kw, message", [
    ({"generation_config": "greedy"}, "generation_config must be a dict (or None), got str"),
    ({"generation_config": [("max_new_tokens", 4)]}, "generation_config must be a dict (or None), got list"),
    ({"chat_history": "earlier"}, "chat_history must be a list of messages or (question, answer) pairs, got str"),
    ({"chat_history": [{"role": "user"}]}, "chat_history[0] must be {'role': 'user', 'content': <str>}"),
    ({"chat_history": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "chat_history[0] must be {'role': 'user', 'content': <str>} (turns alternate user, assistant)"),
    ({"chat_history": [{"role": "user", "content": "q"}]},
     "chat_history ends with a user message that has no assistant answer"),
    ({"chat_history": [("q",)]}, "chat_history[0] must be a (question, answer) pair of strings"),
    ({"chat_history": [("q", 3)]}, "chat_history[0] must be a (question, answer) pair of strings"),
    ({"max_num_frames": 2.5}, "max_num_frames must be a positive integer, got 2.5"),
])
def test_bad_arguments_are_one_line(tiny, clip_path, kw, message):
    model, tokenizer = tiny
    with pytest.raises(videoxl.VideoXLError) as e:
        ask(model, tokenizer, clip_path, **kw)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("kw, message", [
    ({"dtype": torch.int8}, "dtype must be one of"),
    ({"dtype": ["float32"]}, "dtype must be one of"),
])
def test_load_refuses_non_float_dtypes(tiny_dir, kw, message):
    with pytest.raises(videoxl.VideoXLError, match=message):
        videoxl.load(tiny_dir, device="cpu", **kw)


def test_load_refuses_a_non_path():
    with pytest.raises(videoxl.VideoXLError, match="model path must be a folder path"):
        videoxl.load(None)


def test_long_question_refused_before_any_frame(tiny, clip_path, monkeypatch):
    """100,800 characters: counted against the documented limit before the video is touched."""
    model, tokenizer = tiny
    model.kv_cache.clear()
    monkeypatch.setattr(model, "encode_stream", lambda *a, **k: pytest.fail("decoded frames"))
    question = "What happens? " * 7200
    with pytest.raises(videoxl.VideoXLError, match=r"^question is \d+ tokens \(100800 characters\); at most "
                                                   r"8192 are allowed: shorten it$"):
        model.chat(clip_path, tokenizer, question, generation_config=GREEDY)


@pytest.mark.parametrize("error, where", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 42949672960 bytes. Error code 12 (Cannot allocate memory)"), "CPU"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"), "GPU"),
    (MemoryError(), "CPU"),
])
def test_out_of_memory_anywhere_is_one_line(tiny, clip_path, monkeypatch, error, where):
    model, tokenizer = tiny
    model.kv_cache.clear()

    def boom(*a, **k):
        raise error
    monkeypatch.setattr(model.decoder, "forward", boom)
    with pytest.raises(VideoXLMemoryError) as e:
        ask(model, tokenizer, clip_path, max_num_frames=16)
    assert str(e.value) == (f"out of {where} memory while answering; try fewer frames (max_num_frames, now 16), or "
                            "chunk prefill 'streaming' with offload (CLI: --chunk-prefill streaming --offload), "
                            "or a smaller vision batch (chunk_size_for_vision_tower / --vision-chunk, e.g. 8), or "
                            "a shorter question")


def test_other_runtime_errors_are_not_disguised(tiny, clip_path, monkeypatch):
    model, tokenizer = tiny
    model.kv_cache.clear()
    monkeypatch.setattr(model.decoder, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="^bug$"):
        ask(model, tokenizer, clip_path)


def test_cut_off_video_warns_and_reports(tiny, cut_video):
    """A file whose header promises 40 frames but holds 12 whole ones: a warning with both counts, and last_stats."""
    model, tokenizer = tiny
    with pytest.warns(VideoXLWarning, match=r"video ended early: 12 of 40 expected frames read from .*cut\.mp4"):
        ask(model, tokenizer, cut_video, max_num_frames=40, sample_fps=None)
    assert model.last_stats["frames"] == 12 and model.last_stats["frames_expected"] == 40


def test_whole_video_does_not_warn(tiny, clip_path):
    model, tokenizer = tiny
    model.kv_cache.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", VideoXLWarning)
        ask(model, tokenizer, clip_path, max_num_frames=16)
    assert model.last_stats["frames"] == model.last_stats["frames_expected"] == 6


def test_stats_timestamps_and_cache_hit(tiny, clip_path):
    model, tokenizer = tiny
    model.kv_cache.clear()
    ask(model, tokenizer, clip_path, max_num_frames=16, sample_fps=1)
    first = model.last_stats
    assert first["timestamps"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # 30 fps source, one frame a second
    assert first["cache_hit"] is False and "vision_s" in first and "prefill_s" in first
    ask(model, tokenizer, clip_path, max_num_frames=16, sample_fps=1)
    second = model.last_stats
    assert second["cache_hit"] is True and "vision_s" not in second and "prefill_s" not in second
    assert second["timestamps"] == first["timestamps"]


def test_random_weight_checkpoint_is_marked(tiny_dir):
    import json

    from videoxl.checkpoint.loader import inspect_checkpoint

    assert json.load(open(os.path.join(tiny_dir, "config.json")))["videoxl_random_weights"] is True
    ok, text = inspect_checkpoint(tiny_dir)
    assert ok and "weights: RANDOM (made by `videoxl make-tiny`): it runs, its answers are noise" in text


def test_short_text_of_many_tokens_is_counted(tiny, clip_path, monkeypatch):
    """3,000 four-byte characters are 3,000 characters but (byte-level BPE) up to 12,000 tokens: counted, not
    waved through on their character count."""
    model, tokenizer = tiny
    monkeypatch.setattr(model, "encode_stream", lambda *a, **k: pytest.fail("decoded frames"))
    with pytest.raises(videoxl.VideoXLError, match=r"^question is \d+ tokens \(3000 characters\); at most 8192"):
        model.chat(clip_path, tokenizer, "\U0001F600" * 3000, generation_config=GREEDY)
