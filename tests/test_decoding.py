"""Decoding: the device-side sampler against transformers' logits processors, and the fast step's Triton kernels
(interpreted on the CPU) against plain PyTorch. The captured CUDA graph itself is tested in test_gpu.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from videoxl.decoding.sampling import Sampler
from videoxl.decoding.generation import GenerationConfig

VOCAB = 300


def transformers_filtered(logits, prompt_ids, cfg):
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    ids = torch.tensor([prompt_ids])
    scores = logits.clone()[None]
    if cfg.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    if cfg.top_k:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p < 1:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    return scores


@pytest.mark.parametrize("settings", [
    dict(do_sample=True, temperature=0.7, top_k=20),
    dict(do_sample=True, temperature=1.3, top_p=0.8),
    dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3),
])
def test_sampler_filter_equals_transformers(settings):
    # reference: transformers' processors in generate()'s order; exact up to float32 rounding (1e-5)
    torch.manual_seed(1)
    for _ in range(5):
        logits = torch.randn(VOCAB) * 3
        prompt = torch.randint(0, VOCAB, (40,)).tolist()
        cfg = GenerationConfig.from_dict(settings)
        got = Sampler(cfg, VOCAB, torch.device("cpu"), prompt).filter(logits)
        ref = transformers_filtered(logits, prompt, cfg)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        finite = ~torch.isinf(ref)
        assert (got[finite] - ref[finite]).abs().max() < 1e-5


def test_sampler_greedy_penalty_and_seed():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    greedy = Sampler(GenerationConfig.from_dict({"repetition_penalty": 1.2}), 4, torch.device("cpu"), [1])
    assert greedy(logits).item() == 2  # 3.0 / 1.2 = 2.5 < 2.9
    assert greedy(torch.tensor([1.0, 2.0, 2.1, 3.0])).item() == 3
    assert greedy.seen.tolist() == [False, True, True, True]  # the tokens it picked are penalised from now on
    draws = []
    for _ in range(2):
        s = Sampler(GenerationConfig.from_dict({"do_sample": True, "seed": 7}), VOCAB, torch.device("cpu"), [])
        draws.append([s(torch.zeros(VOCAB)).item() for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 5


def test_follow_up_matches_fresh_answer(tiny, clip_path):
    # the decode loop queues a step ahead of the host; the store must still end where the answer ends
    model, tokenizer = tiny
    gen = {"max_new_tokens": 12}
    model.chat(clip_path, tokenizer, "first?", max_num_frames=8, generation_config=gen)
    follow = model.chat(clip_path, tokenizer, "second?", max_num_frames=8, generation_config=gen)
    assert model.last_stats["decode_path"] == "eager" and model.last_stats["generated_tokens"] >= 1
    model.kv_cache.clear()
    assert model.chat(clip_path, tokenizer, "second?", max_num_frames=8, generation_config=gen) == follow


def run_interpreted(script: str, tiny_dir: str) -> dict:
    """tests/`script` run by Triton's interpreter on the CPU in a process of its own; the errors it prints last."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    path = os.path.join(os.path.dirname(__file__), script)
    done = subprocess.run([sys.executable, path, tiny_dir], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_interpreted_kernels_match_torch(tiny_dir):
    errors = run_interpreted("interpreted_kernels.py", tiny_dir)
    # float32 throughout: only the attention's split summation order differs from the reference
    assert errors["attention"] < 1e-5
    assert errors["rms_norm"] == 0 and errors["rope_store"] == 0  # same operations, same roundings
    assert errors["step_logits"] < 1e-4 and errors["step_kv"] < 1e-5
    assert errors["fused_reused"]
    # the FP8 cache (fp32 compute): the kernel over e4m3 K/V with per-token scales against attention over the
    # dequantized cache (summation order only); its store kernel against kv_fp8.quantize, byte for byte; the
    # captured body over an fp8 store against the eager forward over another (same rounding points)
    # (keys up to 8x larger here, so larger logits: 5e-5 absolute on outputs of size ~1 is fp32 summation order)
    assert errors["fp8_attention"] < 5e-5 and errors["fp8_store"] == 0
    # fp16 dot products (a bf16 model's option): the output is rounded to bf16 (2^-8 relative, outputs of size ~1)
    assert errors["fp8_f16_attention"] < 2e-2
    assert errors["fp8_step_logits"] < 1e-4 and errors["fp8_step_kv"] < 1e-5 and errors["fp8_step_valid"]
