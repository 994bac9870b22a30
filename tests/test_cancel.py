"""Cancellation and time limits reach every stage (issue 25): frame decoding, vision batches, prefill layers and
blocks, the bi-level pass and the token loop each stop at their next check with `Cancelled` / `TimedOut`."""
import threading
import time

import numpy as np
import pytest
import torch

from videoxl.cancel import Cancel, Cancelled, TimedOut
from videoxl.errors import VideoXLError
from videoxl.video.stream import FrameStream

GREEDY = {"do_sample": False, "max_new_tokens": 4}


def test_cancel_basics():
    c = Cancel()
    c.check()
    c.set()
    with pytest.raises(Cancelled):
        c.check()
    with pytest.raises(TimedOut):
        Cancel(timeout_s=0).check()
    assert issubclass(TimedOut, Cancelled) and issubclass(Cancelled, VideoXLError)
    with pytest.raises(VideoXLError):
        Cancel(timeout_s=float("nan"))


def test_a_cancelled_question_stops_before_any_frame(tiny, clip_path, monkeypatch):
    model, tokenizer = tiny
    model.kv_cache.clear()
    monkeypatch.setattr(model.vision, "encode", lambda *a, **k: pytest.fail("encoded frames"))
    cancel = Cancel()
    cancel.set()
    with pytest.raises(Cancelled):
        model.chat(clip_path, tokenizer, "What?", max_num_frames=8, generation_config=GREEDY, cancel=cancel)


def endless_stream(delay_s: float) -> FrameStream:
    """A decoder that hands over one 4-frame batch every `delay_s`, for ever (a slow or huge video)."""
    def read(size):
        n = 0
        while True:
            time.sleep(delay_s)
            yield list(range(n, n + 4)), np.zeros((4, 384, 384, 3), np.uint8)
            n += 4
    return FrameStream("endless", list(range(10**6)), 1.0, 10**6, read)


def test_vision_stops_between_batches(tiny):
    model, _ = tiny
    batches = []
    real = model.vision.encode

    def encode(frames, *a, **k):
        batches.append(len(frames))
        if len(batches) == 2:
            cancel.set()
        return real(frames, *a, **k)

    cancel = Cancel()
    model.vision.encode = encode
    try:
        with pytest.raises(Cancelled):
            model.encode_stream(endless_stream(0.0), 4, cancel=cancel)
    finally:
        del model.vision.encode
    assert len(batches) == 2


def test_a_deadline_ends_a_wait_for_frames(tiny):
    """The decoder takes 30 s per batch: the 0.3 s deadline ends the wait, not the batch."""
    model, _ = tiny
    t0 = time.monotonic()
    with pytest.raises(TimedOut):
        model.encode_stream(endless_stream(30.0), 4, cancel=Cancel(timeout_s=0.3))
    assert time.monotonic() - t0 < 10


def test_frame_decoding_threads_stop(cut_video):
    """The PyAV reader's decoding threads look at the Cancel; its consumer raises at the next frame."""
    from videoxl.video.sources import open_video

    stream = open_video(cut_video, max_num_frames=40, sample_fps=None)
    cancel = Cancel()
    batches = stream.batches(2, cancel)
    next(batches)
    cancel.set()
    with pytest.raises(Cancelled):
        next(batches)
    assert not [t for t in threading.enumerate() if t.name.startswith("videoxl-decode-") and t.is_alive()]


def test_prefill_stops_at_the_next_layer(tiny):
    from videoxl.prefill.modes import dense_prefill

    model, _ = tiny
    embeds = torch.randn(1, 32, model.config.text.hidden_size)
    store = model.decoder.new_cache(capacity=64)
    done, cancel = [], Cancel()

    def on_layer(i):
        done.append(i)
        cancel.set()

    with pytest.raises(Cancelled):
        dense_prefill(model.decoder, embeds, store, on_layer, cancel)
    assert done == [0] and len(model.decoder.layers) > 1


def test_streaming_prefill_stops_inside_a_layer(tiny):
    """On a CPU, streaming prefill attends block by block: a deadline is seen between blocks."""
    from videoxl.prefill.modes import block_attention
    from videoxl.prefill.plan import BlockPlan, PrefillConfig
    from videoxl.language.prompt import VideoPrompt

    prompt = VideoPrompt(list(range(40)), visual_positions=list(range(4, 36)), group_starts=[2, 20], video_end=38,
                         timestamps=[0.0] * 8)
    plan = BlockPlan.from_prompt(prompt, PrefillConfig.from_dict({"chunk_prefill_mode": "streaming",
                                                                  "chunk_size": 1, "step_size": 1}))
    q = torch.randn(1, 2, 40, 8)
    calls, cancel = [], Cancel()

    def queries(rows):
        return q[:, :, rows]

    def attend_spy(*a, **k):
        calls.append(1)
        cancel.set()
        return real(*a, **k)

    import videoxl.prefill.modes as modes

    real = modes.attend
    modes.attend = attend_spy
    try:
        with pytest.raises(Cancelled):
            block_attention(plan, queries, q, q, slice(0, 40), cancel)
    finally:
        modes.attend = real
    assert len(calls) == 1


def test_token_loop_stops(tiny, clip_path):
    model, tokenizer = tiny
    cancel = Cancel()
    stream = model.stream_chat(clip_path, tokenizer, "What?", max_num_frames=8,
                               generation_config={"do_sample": False, "max_new_tokens": 50}, cancel=cancel)
    pieces = []
    with pytest.raises(Cancelled):
        for piece in stream:
            pieces.append(piece)
            cancel.set()
    assert len(pieces) == 1 and model.last_stats["generated_tokens"] < 10  # of 50


def test_bilevel_pass_stops(tiny, clip_path):
    from videoxl.decoding.bilevel import mixed_store

    model, tokenizer = tiny
    model.config.enable_chunk_prefill = True
    model.config.prefill_config = {"chunk_prefill_mode": "streaming", "chunk_size": 1, "step_size": 1}
    try:
        model.kv_cache.clear()
        model.chat(clip_path, tokenizer, "What?", max_num_frames=8, generation_config=GREEDY)
        store = next(iter(model.kv_cache.entries.values())).cache
        cancel = Cancel()
        cancel.set()
        with pytest.raises(Cancelled):
            mixed_store(model.decoder, store, None, set(range(len(store.plan.blocks))), 8, cancel=cancel)
    finally:
        model.config.enable_chunk_prefill = False
        model.kv_cache.clear()


def test_vision_tower_sees_the_cancel_every_group_on_a_cpu(tiny):
    """A 96-frame vision slice took ~10 s on a 2-core CPU with the demo model: the tower now runs a group of 4
    frames at a time there and looks at the Cancel before each layer."""
    model, _ = tiny
    tower_calls, cancel = [], Cancel()
    real = model.vision.tower.forward

    def forward(pixels, c=None):
        tower_calls.append(len(pixels))
        cancel.set()
        return real(pixels, c)

    model.vision.tower.forward = forward
    try:
        with pytest.raises(Cancelled):
            list(model.vision.encode(np.zeros((96, 384, 384, 3), np.uint8), 96, cancel))
    finally:
        del model.vision.tower.forward
    assert tower_calls == [4]
