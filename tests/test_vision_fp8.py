"""FP8 vision (issue 22, `vision_dtype="fp8"`): the vision side's linear layers as e4m3 GEMMs. On the CPU torch
runs the same row-wise scaled arithmetic as the H200 (slowly), so these tests check the numbers; the speed is
bench/vision_fp8.py's. Reference: the same checkpoint loaded in fp32 without it."""
import numpy as np
import pytest
import torch

import videoxl
from videoxl.errors import VideoXLError
from videoxl.language.quant import QuantLinear
from videoxl.vision.precision import parse_vision_dtype

# relative L2 error of the visual tokens against fp32 vision (tiny random checkpoint, 8 random frames): measured
# 6.1 %, the fp8 layer's own error on Gaussian weights being 3.6 % (tests/test_quant.py), compounded over layers
TOKEN_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def pair(tiny_dir):
    ref, _ = videoxl.load(tiny_dir, device="cpu", dtype="float32")
    fp8, tok = videoxl.load(tiny_dir, device="cpu", dtype="float32", vision_dtype="fp8")
    return ref, fp8, tok


def test_every_vision_linear_is_fp8_and_nothing_else(pair):
    ref, fp8, _ = pair
    cfg = fp8.config
    quantized = [n for n, m in fp8.vision.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 6 * cfg.vision.layers_run + 2  # q, k, v, out, fc1, fc2 per layer; the projector's 2
    assert all(m.scheme == "fp8" for m in fp8.vision.modules() if isinstance(m, QuantLinear))
    assert not any(isinstance(m, QuantLinear) for m in fp8.decoder.modules())  # the decoder as loaded
    assert type(fp8.vision.tower.embeddings.patch_embedding) is torch.nn.Conv2d
    assert fp8.weights_digest() != ref.weights_digest()  # its video KVs never match a full-precision entry


def test_visual_tokens_close_to_full_precision(pair):
    ref, fp8, _ = pair
    frames = np.random.default_rng(0).integers(0, 256, (8, 384, 384, 3), dtype=np.uint8)
    with torch.inference_mode():
        want, got = ref.vision(frames), fp8.vision(frames)
    assert got.shape == want.shape
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < TOKEN_TOLERANCE, err  # > 0: the fp8 path really ran


def test_chat_runs_with_fp8_vision(pair, tmp_path):
    from tests.media import make_video

    _, fp8, tok = pair
    path = make_video(str(tmp_path / "v.mp4"), seconds=2.0, fps=4)
    answer = fp8.chat(path, tok, "What is shown?", max_num_frames=8, sample_fps=4,
                      generation_config={"do_sample": False, "max_new_tokens": 3})
    assert isinstance(answer, str) and fp8.last_stats["frames"] == 8


@pytest.mark.parametrize("bad", ["fp16", "int8", 8, ["fp8"]])
def test_unknown_vision_dtype_is_refused_in_one_line(tiny_dir, bad):
    with pytest.raises(VideoXLError, match="vision_dtype must be 'fp8' or none") as e:
        videoxl.load(tiny_dir, device="cpu", vision_dtype=bad)
    assert "\n" not in str(e.value)
    assert parse_vision_dtype("FP8") == "fp8" and parse_vision_dtype("model") is None


def test_fp8_vision_on_a_card_without_it_says_what_to_do(monkeypatch):
    from videoxl.language import quant

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(VideoXLError) as e:
        quant.check_device("fp8", torch.device("cuda"), torch.bfloat16, what="vision_dtype")
    msg = str(e.value)
    assert msg.startswith("vision_dtype='fp8' needs a GPU with FP8") and "leave vision_dtype unset" in msg


def test_fp8_vision_state_is_not_a_checkpoint(pair, tmp_path):
    from videoxl.checkpoint.tiny import save_checkpoint

    _, fp8, _ = pair
    with pytest.raises(VideoXLError, match="not a checkpoint"):
        save_checkpoint(str(tmp_path / "q"), fp8.config, fp8.state_dict())
