"""Vision + prefill time and peak GPU memory on the full-size Video-XL-2 architecture (random bf16 weights).

    python bench/prefill.py --frames 256 1024 2048 --out results.json [--check]

For each frame count, four ways to get the video's KV cache (the question is left out: it is the same few
dozen tokens for all and runs after the video in every mode):
  dense      our engine, plain causal prefill (flash attention, a layer at a time)
  mask       chunk prefill 'mask': one forward pass, FlexAttention BlockMask (block-sparse)
  streaming  chunk prefill 'streaming' with offload=True (each finished layer's KVs go to pinned CPU memory)
  hf         transformers' Qwen2ForCausalLM(inputs_embeds=...), SDPA, full attention (the weights are shared)
Every way runs the same vision side (SigLIP -> DTS -> projector) on synthetic frames, so no decode time.
Time is wall time around vision + prefill after a warm-up run at a small size; an out-of-memory is "OOM".
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

from videoxl.prefill.plan import BlockPlan, PrefillConfig  # noqa: E402
from videoxl.model import VideoXL  # noqa: E402
from videoxl.language.prompt import build_prompt  # noqa: E402
from videoxl.checkpoint.tiny import full_size_config, make_tokenizer, tiny_config  # noqa: E402

CHUNKING = dict(chunk_size=16, step_size=4, chunk_size_for_vision_tower=96)  # the reference's evaluation setting


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_model(device, tiny=False) -> VideoXL:
    with torch.device("meta"):
        model = VideoXL(tiny_config() if tiny else full_size_config())
    model = model.to_empty(device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def random_checkpoint(folder: str, tiny: bool = False) -> str:
    """A checkpoint folder of random_model's weights (bf16 full-size, or the tiny fp32 one), written once: a
    `videoxl` command loads it as a user's. Built on the GPU when there is one (filling 8 B parameters on the
    CPU takes minutes)."""
    from videoxl.checkpoint.tiny import save_checkpoint

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    t = time.perf_counter()
    model = random_model(torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu"), tiny)
    model.config.random_weights = True
    save_checkpoint(folder + ".tmp", model.config, {k: v.cpu() for k, v in model.state_dict().items()},
                    shards=4, dtype=torch.float32 if tiny else torch.bfloat16)
    make_tokenizer(folder + ".tmp")
    os.replace(folder + ".tmp", folder)
    del model
    log(f"checkpoint {folder} written in {time.perf_counter() - t:.1f} s")
    return folder


def hf_qwen2(model: VideoXL):
    """transformers' Qwen2ForCausalLM on the same weights (assigned, not copied)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t = model.config.text
    cfg = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                      num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                      rope_theta=t.rope_theta, max_position_embeddings=1 << 20, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg)
    state = {("lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.") else "model." + k: v
             for k, v in model.decoder.state_dict().items()}
    hf.load_state_dict(state, assign=True, strict=False)
    with torch.device(model.device):  # its buffers (inv_freq) were left on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    return hf.eval()


def prompt_for(tokenizer, frames: int, model: VideoXL):
    timestamps = [round(i * 0.5, 1) for i in range(frames)]  # 2 fps
    return build_prompt(tokenizer, "What happens?", timestamps, model.config.tokens_per_group,
                        tokenizer.convert_tokens_to_ids("<|vision_pad|>"))


def run_one(model, hf, tokenizer, frames_u8, way: str) -> dict:
    cuda = model.device.type == "cuda"
    sync()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        visual = torch.cat(list(model.vision.encode(frames_u8, CHUNKING["chunk_size_for_vision_tower"])))
        sync()
        t_vision = time.perf_counter() - t0
        prompt = prompt_for(tokenizer, len(frames_u8), model)
        embeds = model.embed_prompt(prompt, visual, prompt.video_end)
        del visual
        stats = {}
        if way == "hf":
            out = hf(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            del out
        else:
            chunking = None if way == "dense" else PrefillConfig(
                chunk_prefill_mode="mask" if way == "mask" else "streaming", offload=way == "streaming",
                **CHUNKING)
            store = model.decoder.new_cache(capacity=prompt.video_end + 64, offload=way == "streaming")
            stats = model.prefill(embeds, store, prompt, chunking)
            del store
        sync()
    total = time.perf_counter() - t0
    return {"seconds": round(total, 3), "vision_s": round(t_vision, 3), "prefill_s": round(total - t_vision, 3),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, "tokens": prompt.video_end,
            "attended_share": stats.get("attended_share", 1.0)}


def profile_vision(model, frames_u8) -> None:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(2):
            torch.cat(list(model.vision.encode(frames_u8, CHUNKING["chunk_size_for_vision_tower"])))
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            torch.cat(list(model.vision.encode(frames_u8, CHUNKING["chunk_size_for_vision_tower"])))
            sync()
    # aten ops with the GPU time of their kernels, by input shape: which op each slow kernel belongs to
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=70)
    print(table, flush=True)


def check_paths(model, tokenizer, frames_u8) -> dict:
    """On the GPU, bf16: flex streaming vs flex mask vs the CPU-style per-block SDPA path, and our dense
    prefill vs transformers'. Relative error of layer-27 keys/values (bf16 rounding is ~1e-2 at most)."""
    import videoxl.prefill.modes as prefill

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    with torch.inference_mode():
        visual = torch.cat(list(model.vision.encode(frames_u8, 96)))
        prompt = prompt_for(tokenizer, len(frames_u8), model)
        embeds = model.embed_prompt(prompt, visual, prompt.video_end)
        plan = BlockPlan.from_prompt(prompt, PrefillConfig(**CHUNKING))
        stores = {}
        for name in ("mask", "stream_flex", "stream_sdpa", "dense"):
            log(f"check {name}")
            store = model.decoder.new_cache(capacity=prompt.video_end + 8)
            if name == "mask":
                prefill.mask_prefill(model.decoder, embeds, store, plan)
            elif name == "stream_flex":
                prefill.streaming_prefill(model.decoder, embeds, store, plan)
            elif name == "stream_sdpa":
                prefill.layerwise_prefill(model.decoder, embeds, store, lambda q, k, v, sl: [
                    prefill.block_attention(plan, q, k, v, s) for s in sl])
            else:
                prefill.dense_prefill(model.decoder, embeds, store)
            stores[name] = store
        last = model.config.text.num_hidden_layers - 1
        k = {n: s.layer(last)[0] for n, s in stores.items()}
        out = {"mask_vs_stream_flex": rel(k["mask"], k["stream_flex"]),
               "stream_flex_vs_sdpa_blocks": rel(k["stream_flex"], k["stream_sdpa"]),
               "mask_vs_dense": rel(k["mask"], k["dense"])}
        hf = hf_qwen2(model)
        cache = hf(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).past_key_values
        hf_k = cache.layers[last].keys if hasattr(cache, "layers") else cache.key_cache[last]
        out["dense_vs_transformers"] = rel(k["dense"], hf_k)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--ways", nargs="+", default=["dense", "mask", "streaming", "hf"])
    ap.add_argument("--out", default="prefill.json")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--warm-up-up-to", type=int, default=4096, help="run sizes above this once, not twice")
    ap.add_argument("--profile-vision", type=int, default=0, help="profile the vision side on N frames")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke test of this script")
    ap.add_argument("--stack-dump-s", type=float, default=0, help="dump all stacks every N s (hang hunting)")
    args = ap.parse_args()
    if args.stack_dump_s:
        import faulthandler

        faulthandler.dump_traceback_later(args.stack_dump_s, repeat=True)
    device = torch.device("cpu" if args.tiny else "cuda")
    model = random_model(device, args.tiny)
    log("model ready")
    hf = hf_qwen2(model)
    tokenizer = make_tokenizer(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(max(args.frames), 384, 384, 3), dtype=np.uint8)
    log("frames ready")
    results = {"device": torch.cuda.get_device_name() if not args.tiny else "cpu (tiny)", "torch": torch.__version__, "chunking": CHUNKING,
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    if args.check:
        results["check"] = check_paths(model, tokenizer, frames[:256])
        print("check:", json.dumps(results["check"]), flush=True)
    if args.profile_vision:
        profile_vision(model, frames[:args.profile_vision])
    for n in args.frames:
        for way in args.ways:
            log(f"{n} frames, {way}")
            try:  # the first run at a size warms up (compiles FlexAttention for new shapes, loads kernels)
                first = run_one(model, hf, tokenizer, frames[:n], way)
                if n <= args.warm_up_up_to:
                    r = run_one(model, hf, tokenizer, frames[:n], way)
                    r["first_run_s"] = first["seconds"]
                else:  # too long to run twice within a call; kernels are warm from the smaller sizes
                    r = first
            except torch.cuda.OutOfMemoryError:
                r = {"seconds": "OOM"}
                sync()
            r.update(frames=n, way=way)
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"\n{'frames':>7} {'way':>10} {'total s':>8} {'vision s':>9} {'prefill s':>10} {'peak GB':>8} "
          f"{'tokens':>8} {'share':>6}")
    for r in results["runs"]:
        print(f"{r['frames']:>7} {r['way']:>10} {r['seconds']!s:>8} {r.get('vision_s', '')!s:>9} "
              f"{r.get('prefill_s', '')!s:>10} {r.get('peak_gb', '')!s:>8} {r.get('tokens', '')!s:>8} "
              f"{r.get('attended_share', '')!s:>6}")


if __name__ == "__main__":
    main()
