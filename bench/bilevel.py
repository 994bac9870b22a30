"""Bi-level decoding against dense decoding after a long video, full-size architecture, random bf16 weights.

    python bench/bilevel.py --frames 2048 10000 --budget 0.25 --out bilevel.json

Per frame count: synthetic frames -> vision -> 'streaming' chunk prefill with offload=True (the reference's
blocks: chunk_size=16, step_size=4), then
  dense     the question over the whole offloaded store, eager decoding from pinned memory (what you get
            without enable_sparse)
  bilevel   once per video (after the prefill, reported apart): the sparse level, the mixed store and its
            captured decode step; then per question: the relevance pass, the mixed cache built on the GPU (only
            chosen blocks' dense KVs travel), captured decoding; twice, with two questions
Time to first token counts from the question (the video already prefilled) to the first sampled token.
Peak GPU memory is over the whole run, prefill included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from prefill import log, prompt_for, random_model  # noqa: E402

from videoxl.prefill.plan import PrefillConfig  # noqa: E402
from videoxl.decoding import decode_step, generate_tokens  # noqa: E402
from videoxl.decoding.state import DecodeState
from videoxl.decoding.bilevel import bilevel_question, prepare_bilevel  # noqa: E402
from videoxl.decoding.sparse_config import SparseConfig  # noqa: E402
from videoxl.decoding.generation import GenerationConfig  # noqa: E402
from videoxl.language.prompt import build_prompt  # noqa: E402
from videoxl.checkpoint.tiny import make_tokenizer  # noqa: E402

CHUNKING = PrefillConfig(chunk_prefill_mode="streaming", chunk_size=16, step_size=4, offload=True,
                         chunk_size_for_vision_tower=96)


def answer(model, cache, logits, steps: int, mode: str, t_question: float, state=None) -> dict:
    gen = GenerationConfig(max_new_tokens=steps)
    step = decode_step(model.decoder, cache, steps, mode, state)
    stats = {}
    first = None
    for _ in generate_tokens(step, logits, gen, [11], set(), model.config.text.vocab_size, stats):
        if first is None:
            first = time.perf_counter() - t_question
    return {"ttft_s": round(first, 3), "tokens_per_s": stats["decode_tokens_per_s"],
            "ms_per_token": round(1000 * stats["decode_s"] / stats["generated_tokens"], 2),
            "capture_s": step.capture_s}


def run(model, tokenizer, frames_u8, budget: float, dense_steps: int, steps: int) -> list[dict]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        visual = torch.cat(list(model.vision.encode(frames_u8, CHUNKING.chunk_size_for_vision_tower)))
        prompt = prompt_for(tokenizer, len(frames_u8), model)
        embeds = model.embed_prompt(prompt, visual, prompt.video_end)
        del visual
        store = model.decoder.new_cache(capacity=prompt.video_end + 64, offload=True)
        model.prefill(embeds, store, prompt, CHUNKING)
        del embeds
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        prefill_peak = torch.cuda.max_memory_allocated() / 2**30
        base = {"frames": len(frames_u8), "tokens": prompt.video_end, "prefill_s": round(prefill_s, 2),
                "prefill_peak_gb": round(prefill_peak, 2)}
        log(f"prefilled {base}")
        tail = torch.tensor(prompt.input_ids[prompt.video_end:], device=model.device)
        # dense: the question over the whole offloaded store
        t_q = time.perf_counter()
        logits = model.decoder(model.decoder.embed_tokens(tail)[None], store)
        r = answer(model, store, logits, dense_steps, "eager", t_q)
        out.append(dict(base, way="dense (offloaded KVs)", **r,
                        peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2)))
        log(json.dumps(out[-1]))
        store.truncate(prompt.video_end)
        cfg = SparseConfig.from_dict({"budget": budget})
        t_p = time.perf_counter()
        state = DecodeState()
        prepare_bilevel(model.decoder, store, cfg, steps, state)  # once per video: sparse level, mixed store, graph
        torch.cuda.synchronize()
        base["bilevel_prepare_s"] = round(time.perf_counter() - t_p, 3)
        for i, question in enumerate(("What happens?", "Which colour is the car at the end?")):
            q_prompt = build_prompt(tokenizer, question, prompt.timestamps, model.config.tokens_per_group,
                                    tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
            tail = torch.tensor(q_prompt.input_ids[q_prompt.video_end:], device=model.device)
            torch.cuda.synchronize()
            t_q = time.perf_counter()
            mixed, logits, info = bilevel_question(model.decoder, store, tail, cfg, prompt.timestamps,
                                                   CHUNKING.groups_per_block, steps, state)
            torch.cuda.synchronize()
            built = time.perf_counter() - t_q
            r = answer(model, mixed, logits, steps, "captured", t_q, state)
            out.append(dict(base, way=f"bilevel {budget:.0%}" + (" (2nd question)" if i else ""), **r,
                            bilevel_s=round(built, 3), kept_share=info["kept_share"],
                            dense_blocks=len(info["dense_blocks"]), blocks=info["blocks"],
                            peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2)))
            log(json.dumps(out[-1]))
            del mixed, logits
    del store
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[2048, 10000])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--dense-steps", type=int, default=8)
    ap.add_argument("--out", default="bilevel.json")
    args = ap.parse_args()
    model = random_model(torch.device("cuda"))
    tokenizer = make_tokenizer(tempfile.mkdtemp())
    frames = np.random.default_rng(0).integers(0, 256, size=(max(args.frames), 384, 384, 3), dtype=np.uint8)
    log("ready")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "chunking": "streaming 16/4 offload", "runs": []}
    for n in args.frames:
        res["runs"] += run(model, tokenizer, frames[:n], args.budget, args.dense_steps, args.steps)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{'frames':>6} {'way':>26} {'TTFT s':>7} {'tok/s':>7} {'kept':>6} {'peak GB':>8} {'prefill peak':>12}")
    for r in res["runs"]:
        print(f"{r['frames']:>6} {r['way']:>26} {r['ttft_s']:>7} {r['tokens_per_s']!s:>7} "
              f"{r.get('kept_share', 1.0):>6} {r['peak_gb']:>8} {r['prefill_peak_gb']:>12}")


if __name__ == "__main__":
    main()
