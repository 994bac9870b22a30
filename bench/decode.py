"""Decode speed (ms/token, tokens/s) on the full-size Video-XL-2 decoder (Qwen2.5-7B, random bf16 weights).

    python bench/decode.py --tokens 79133 387882 --out decode.json [--profile]

For each cached length, the cache is filled with random K/V (decode time depends on its length, not its
values), then greedy decoding with one host sync per token, as `chat` does:
  captured   our fast path: one CUDA graph per step, split-KV Triton attention (KVs on the GPU)
  eager      our eager step (KVs on the GPU)
  offload    our eager step with the KVs in pinned CPU memory, each layer's copy behind the previous layer
  hf         transformers' Qwen2ForCausalLM on the same weights, DynamicCache, SDPA
Also measured once: device-to-device copy bandwidth and pinned host-to-device bandwidth, which give the
floors (weights + KVs over the former; KVs over the latter for offload).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from prefill import hf_qwen2, log, random_model  # noqa: E402

from videoxl.decoding import decode_step, generate_tokens  # noqa: E402
from videoxl.decoding.generation import GenerationConfig  # noqa: E402

STEPS = {"captured": 128, "eager": 24, "offload": 12, "hf": 24}


def bandwidths(device) -> dict:
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    for _ in range(2):
        y.copy_(x)
        x[: host.numel()].copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    torch.cuda.synchronize()
    d2d = 5 * 2 * x.numel() / (time.perf_counter() - t0)  # bytes read + written
    t0 = time.perf_counter()
    for _ in range(5):
        x[: host.numel()].copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 5 * host.numel() / (time.perf_counter() - t0)
    del x, y, host
    torch.cuda.empty_cache()
    return {"d2d_GBps": round(d2d / 1e9, 1), "h2d_pinned_GBps": round(h2d / 1e9, 1)}


def filled_store(model, tokens: int, offload: bool):
    store = model.decoder.new_cache(capacity=tokens + 1024, offload=offload)
    gen = torch.Generator(device=model.device).manual_seed(0)
    cfg = model.config.text
    with torch.inference_mode():
        for layer in range(cfg.num_hidden_layers):
            k, v = store.layer_slot(layer, tokens)
            for buf in (k, v):
                for h in range(buf.shape[1]):  # a head at a time: the temporary stays small
                    part = torch.randn(buf.shape[2:], generator=gen, device=model.device, dtype=torch.float32)
                    buf[0, h].copy_(part.to(buf.dtype))
            store.commit(layer, tokens)
        store.synchronize()
    return store


def time_ours(model, store, mode: str, steps: int) -> dict:
    gen = GenerationConfig(max_new_tokens=steps)
    with torch.inference_mode():
        start = store.length
        token = torch.tensor([[11]], device=model.device)
        logits = model.decoder(model.decoder.embed_tokens(token), store)  # the prompt's last token
        t0 = time.perf_counter()
        step = decode_step(model.decoder, store, steps, mode)
        setup = time.perf_counter() - t0
        stats = {}
        list(generate_tokens(step, logits, gen, [11], set(), model.config.text.vocab_size, stats))
        # once more, timed: the first run warms kernels (and captures)
        store.truncate(start + 1)
        step = decode_step(model.decoder, store, steps, mode)
        stats = {}
        list(generate_tokens(step, logits, gen, [11], set(), model.config.text.vocab_size, stats))
        store.truncate(start)
    ms = 1000 * stats["decode_s"] / stats["generated_tokens"]
    return {"ms_per_token": round(ms, 2), "tokens_per_s": round(1000 / ms, 1), "steps": stats["generated_tokens"],
            "first_setup_s": round(setup, 3)}


def time_hf(hf, model, tokens: int, steps: int) -> dict:
    from transformers import DynamicCache

    cfg = model.config.text
    cache = DynamicCache()
    gen = torch.Generator(device=model.device).manual_seed(0)
    with torch.inference_mode():
        for layer in range(cfg.num_hidden_layers):
            shape = (1, cfg.num_key_value_heads, tokens, cfg.head_dim)
            k = torch.randn(shape, generator=gen, device=model.device, dtype=torch.bfloat16)
            v = torch.randn(shape, generator=gen, device=model.device, dtype=torch.bfloat16)
            cache.update(k, v, layer)
        token = torch.tensor([[11]], device=model.device)
        times = []
        for i in range(steps + 4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            int(token)  # one host sync per token, as a streaming chat needs
            times.append(time.perf_counter() - t0)
    del cache
    ms = 1000 * sum(times[4:]) / steps
    return {"ms_per_token": round(ms, 2), "tokens_per_s": round(1000 / ms, 1), "steps": steps}


def profile_step(model, store) -> None:
    """The fast step's body run eagerly under the profiler: which kernels take the time."""
    from torch.profiler import ProfilerActivity, profile

    from videoxl.decoding.captured import CapturedStep

    with torch.inference_mode():
        step = CapturedStep(model.decoder, store)
        step.pos.fill_(store.length)
        for _ in range(3):
            step._body()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step._body()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[79133, 387882])
    ap.add_argument("--ways", nargs="+", default=["captured", "eager", "offload", "hf"])
    ap.add_argument("--out", default="decode.json")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    model = random_model(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
    weight_bytes -= model.decoder.embed_tokens.weight.numel() * 2  # a step reads one row of the embedding
    hf = hf_qwen2(model) if "hf" in args.ways else None
    log("model ready")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "weight_GB": round(weight_bytes / 1e9, 2), **bandwidths(device), "runs": []}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    cfg = model.config.text
    for n in args.tokens:
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * n
        floors = {"kv_GB": round(kv_bytes / 1e9, 2),
                  "hbm_floor_ms": round(1000 * (weight_bytes + kv_bytes) / (res["d2d_GBps"] * 1e9), 2),
                  "pcie_floor_ms": round(1000 * kv_bytes / (res["h2d_pinned_GBps"] * 1e9), 2)}
        for offload in (False, True):
            ways = [w for w in args.ways if (w == "offload") == offload and w != "hf"]
            if not ways:
                continue
            store = filled_store(model, n, offload)
            if args.profile and not offload:
                profile_step(model, store)
            for way in ways:
                log(f"{n} tokens, {way}")
                try:
                    r = time_ours(model, store, "eager" if way == "offload" else way, STEPS[way])
                except torch.cuda.OutOfMemoryError:
                    r = {"ms_per_token": "OOM"}
                r.update(tokens=n, way=way, **floors)
                res["runs"].append(r)
                print(json.dumps(r), flush=True)
            del store
            torch.cuda.empty_cache()
        if hf is not None:
            log(f"{n} tokens, hf")
            try:
                r = time_hf(hf, model, n, STEPS["hf"])
            except torch.cuda.OutOfMemoryError:
                r = {"ms_per_token": "OOM"}
            r.update(tokens=n, way="hf", **floors)
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{'tokens':>7} {'way':>9} {'ms/token':>9} {'tok/s':>7} {'floor ms':>9} {'setup s':>8}")
    for r in res["runs"]:
        floor = r["pcie_floor_ms"] if r["way"] == "offload" else r["hbm_floor_ms"]
        print(f"{r['tokens']:>7} {r['way']:>9} {r['ms_per_token']!s:>9} {r.get('tokens_per_s', '')!s:>7} "
              f"{floor!s:>9} {r.get('first_setup_s', '')!s:>8}")


if __name__ == "__main__":
    main()
