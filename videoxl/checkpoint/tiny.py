"""Tiny random-weight checkpoints in the released on-disk format, for tests, the demo and benchmarks.

The folder has what a released Video-XL-2 folder has: `config.json` (LLaVA-Qwen keys), sharded safetensors with
`model.safetensors.index.json`, checkpoint tensor names (incl. the unused `model.text_mlp`), and a byte-level BPE
tokenizer with the Qwen special tokens. Everything is loaded back through `videoxl.load`, the users' path.
"""
from __future__ import annotations

import json
import os
import torch

from videoxl.config import TextConfig, VideoXLConfig, VisionConfig
from videoxl.checkpoint.loader import our_to_checkpoint
from videoxl.errors import VideoXLError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]
CORPUS = (
    "You are a helpful assistant. How many people are in the video? What happens at the start and the end? "
    "Describe the scene. The answer is A B C D. Time 0.0s: 1.0s 2.5s 12.5s 100.0s seconds minutes colour red "
    "green blue square moving left right up down person car dog cat 0123456789 the a an of in on at is are"
)


def tiny_config(vocab_size: int = 512) -> VideoXLConfig:
    """Small enough to run on a CPU in seconds, with every structural feature of the real model kept:
    grouped-query attention, a vision tower whose last layer is dropped, DTS at width divisible by 32."""
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0)
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    return VideoXLConfig(text=text, vision=vision, mm_hidden_size=64)


def make_tokenizer(out_dir: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def random_state(cfg: VideoXLConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with enough spread that outputs vary with the input (not a near-constant network)."""
    from videoxl.model import VideoXL

    torch.manual_seed(seed)
    model = VideoXL(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or "layer_norm" in name:
            p = 1.0 + 0.1 * torch.randn_like(p)
        elif p.ndim == 1:
            p = 0.02 * torch.randn_like(p)
        else:
            p = torch.randn_like(p) * min(0.2, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.05)
        state[name] = p.contiguous()
    return state


def save_checkpoint(out_dir: str, cfg: VideoXLConfig, state: dict[str, torch.Tensor], shards: int = 2,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write `state` (our names) under the released names, split into `shards` safetensors files."""
    from safetensors.torch import save_file

    if any(k.endswith(".qweight") for k in state):  # the loader would refuse it, but only once written
        raise VideoXLError("this state holds quantized layers (videoxl.load(..., quantize=...)): it is not a "
                           "checkpoint; save the bf16 model instead")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {our_to_checkpoint(k): v.to(dtype).contiguous() for k, v in state.items()}
    h = cfg.text.hidden_size  # the release carries this unused text MLP; keep it so the loader must skip it
    tensors["model.text_mlp.0.weight"] = torch.zeros(h, h, dtype=dtype)
    tensors["model.text_mlp.0.bias"] = torch.zeros(h, dtype=dtype)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)


def make_tiny(out_dir: str, seed: int = 0, vocab_size: int = 512) -> str:
    """Write a tiny random-weight Video-XL-2 checkpoint folder; returns its path."""
    cfg = tiny_config(vocab_size)
    cfg.random_weights = True  # `inspect` and `chat` tell users
    make_tokenizer(out_dir, vocab_size)
    save_checkpoint(out_dir, cfg, random_state(cfg, seed))
    return out_dir


def full_size_config() -> VideoXLConfig:
    """The released architecture (Qwen2.5-7B + SigLIP so400m, 26 layers run): for benchmarks."""
    return VideoXLConfig()


def make_demo_video(path: str, seconds: float = 8.0, fps: int = 30, size: tuple[int, int] = (96, 64)) -> str:
    """A small synthetic clip (a coloured square crossing a gradient) written with PyAV."""
    import av
    import numpy as np

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w, h = size
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        ramp = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
        for n in range(int(seconds * fps)):
            img = np.broadcast_to(ramp, (h, w, 3)).copy()
            x = int((w - 16) * n / max(1, seconds * fps - 1))
            img[h // 2 - 8:h // 2 + 8, x:x + 16] = ((n * 7) % 256, 40, 255 - (n * 7) % 256)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
