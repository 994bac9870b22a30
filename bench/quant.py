"""Quantized decoder weights (issue 22) on the full-size decoder (Qwen2.5-7B shapes, random weights), one run:

    python bench/quant.py --out-dir DIR [--tokens 79133] [--steps 128] [--schemes int8 int4 fp8] [--tiny]

Per scheme (bf16 first, then each quantized copy of the same bf16 weights; embedding and lm_head shared):
  kernel_check  each quantized layer kind against its own dequantized weight on the device (1 and 300 rows):
                says the CUDA kernels (Triton int8, tinygemm int4, fp8 _scaled_mm) compute what they should;
  weights_GB    the decoder's bytes on the device (unique storages), and memory.weight_bytes' estimate;
  decode        tokens/s of the captured step at `--tokens` cached tokens (random K/V), greedy, one host sync
                per token, as chat decodes: the first run captures and warms, the second is timed;
  accuracy      against bf16 over the same cache: logits' relative L2 error and top-1 agreement, teacher-forced
                on bf16's greedy tokens; and how many free-running greedy tokens equal bf16's;
  prefill       a 2,048-token eager prefill (the prefill path's layers, M > 1): last logits' relative error.
A scheme "W+kv-fp8" (or "kv-fp8" alone: bf16 weights) runs weights W over an FP8 copy of the same cache
(`kv_dtype="fp8"`, language/kv_fp8.py), its prefill with an FP8 cache too; `kv_GB` gives the cache's bytes.
Results: DIR/quant.json (and printed). `--tiny` runs the tiny config on the CPU (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from decode import filled_store  # noqa: E402
from prefill import log, random_model  # noqa: E402

from videoxl.decoding import generate_tokens  # noqa: E402
from videoxl.decoding.eager import EagerStep  # noqa: E402
from videoxl.decoding.generation import GenerationConfig  # noqa: E402
from videoxl.language import quant  # noqa: E402
from videoxl.language.decoder import Qwen2Decoder  # noqa: E402
from videoxl.language.kv_store import KVStore  # noqa: E402
from videoxl.memory import weight_bytes  # noqa: E402

GB = 1e9


def quantized_copy(decoder: Qwen2Decoder, scheme: str) -> Qwen2Decoder:
    """The decoder with its layers' linears quantized as `videoxl.load` does; other tensors shared."""
    with torch.device("meta"):
        holder = nn.Module()
        holder.decoder = Qwen2Decoder(decoder.cfg)
    state = {"decoder." + k: v for k, v in decoder.state_dict().items()}
    layers = {}
    for name in [n for n in state if quant.is_target(n)]:
        layers[name[:-len(".weight")]] = quant.QuantLinear.quantize(state.pop(name), None, scheme)
    quant.install(holder, layers, state)
    holder.load_state_dict(state, assign=True, strict=True)
    return holder.decoder.eval()


def stored_bytes(module: nn.Module) -> int:
    seen = {}
    for t in (*module.parameters(), *module.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def kernel_check(decoder: Qwen2Decoder, scheme: str) -> dict:
    """Each layer kind of layer 0, fused q/k/v and gate/up too, against x @ dequantized weight^T (+ bias), as
    relative L2 errors: ~1e-3 (the bf16 output's rounding) when the kernel is right; fp8 adds the activations'
    rounding (~3%, the CPU measures the same)."""
    layer = decoder.layers[0]
    a, m = layer.self_attn, layer.mlp
    kinds = {"q_proj": a.q_proj, "o_proj": a.o_proj, "down_proj": m.down_proj,
             "qkv": quant.fuse_once([a.q_proj, a.k_proj, a.v_proj]), "gate_up": quant.fuse_once([m.gate_proj, m.up_proj])}
    kinds = {k: v for k, v in kinds.items() if isinstance(v, quant.QuantLinear)}  # int4 on the CPU: not fused
    dev, dtype = decoder.embed_tokens.weight.device, decoder.embed_tokens.weight.dtype
    out = {}
    with torch.inference_mode():
        for kind, lin in kinds.items():
            w = lin.dequantize(torch.float32)
            worst = 0.0
            for rows in (1, 300):
                x = torch.randn(rows, lin.in_features, device=dev).to(dtype)
                ref = x.float() @ w.t() + (lin.bias.float() if lin.bias is not None else 0)
                got = lin(x).float()
                worst = max(worst, ((got - ref).norm() / ref.norm()).item())
            out[kind] = round(worst, 5)
            del w
    return out


def fp8_copy(model, store):
    """An FP8 store holding the same K/V as `store`, quantized a layer at a time."""
    fp8 = KVStore(store.num_layers, store.num_kv_heads, store.head_dim, store.dtype, store.device, store.capacity,
                  kv_dtype="fp8")
    with torch.inference_mode():
        for layer in range(store.num_layers):
            k, v = fp8.layer_slot(layer, store.length)
            src_k, src_v = store.layer(layer)
            k.copy_(src_k)
            v.copy_(src_v)
            fp8.commit(layer, store.length)
    return fp8


def make_step(decoder, store):
    if store.device.type != "cuda":
        return EagerStep(decoder, store)
    from videoxl.decoding.captured import CapturedStep

    step = CapturedStep(decoder, store)  # not decoding.decode_step: its graphs are kept per store, not decoder
    step.capture()
    return step


def run_tokens(step, store, n: int, first: torch.Tensor, feed: list[int] | None, steps: int):
    """Logits [steps, vocab] from `first`, feeding `feed` (teacher forcing) or the greedy tokens; the store is
    left at n tokens."""
    store.truncate(n)
    step.start()
    logits, token = [], first
    with torch.inference_mode():
        for i in range(steps):
            out = step.step(token.view(1))
            logits.append(out.float().reshape(-1).clone())
            nxt = feed[i] if feed is not None else int(out.argmax())
            token = torch.tensor([nxt], device=store.device)
    store.truncate(n)
    return torch.stack(logits)


def time_decode(step, store, n: int, first_logits: torch.Tensor, steps: int, vocab: int) -> dict:
    gen = GenerationConfig(max_new_tokens=steps)
    result = {}
    for _ in range(2):  # the first run warms (the graph is already captured)
        store.truncate(n)
        step.start()
        stats = {}
        list(generate_tokens(step, first_logits, gen, [11], set(), vocab, stats))
        result = {"tokens_per_s": stats["decode_tokens_per_s"], "ms_per_token":
                  round(1000 * stats["decode_s"] / stats["generated_tokens"], 3), "steps": stats["generated_tokens"]}
    store.truncate(n)
    return result


def prefill_logits(decoder, tokens: int, seed: int = 1) -> torch.Tensor:
    dev, dtype = decoder.embed_tokens.weight.device, decoder.embed_tokens.weight.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(0, decoder.cfg.vocab_size, (1, tokens), generator=gen, device=dev)
    with torch.inference_mode():
        return decoder(decoder.embed_tokens(ids), decoder.new_cache(tokens))[0, -1].float()


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    return {"logit_rel_err": round(((got - ref).norm() / ref.norm()).item(), 5),
            "logit_max_abs_err": round((got - ref).abs().max().item(), 4),
            "top1_agreement": round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--tokens", type=int, default=79133)  # 2,048 frames
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--schemes", nargs="+", default=["int8", "int4", "fp8"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--attention-from", default=None,
                    help="an attn_sweep.json: decode with its picked kernel settings (bench/attn_sweep.py)")
    args = ap.parse_args()
    if args.attention_from:
        from videoxl.decoding import kernels

        picks = json.load(open(args.attention_from))["picks"]
        for kv, pick in picks.items():
            kernels.ATTENTION_CONFIG[kv == "fp8"].update({k: pick[k] for k in kernels.ATTENTION_CONFIG[False]})
        print("attention settings:", kernels.ATTENTION_CONFIG, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    device = torch.device("cpu" if args.tiny else "cuda")
    t_start = time.perf_counter()
    model = random_model(device, tiny=args.tiny)
    base = model.decoder
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "cached_tokens": args.tokens, "steps": args.steps, "schemes": {}}
    store = filled_store(model, args.tokens, False)
    vocab = base.cfg.vocab_size
    first = torch.tensor([11], device=device)
    with torch.inference_mode():
        first_logits = base(base.embed_tokens(first.view(1, 1)), store)[0]  # the prompt's last token
    n = store.length
    ref_prefill = prefill_logits(base, args.prefill_tokens)
    log("bf16 model and cache ready")
    ref_greedy = ref_forced = None
    bf16_store, fp8_store = store, None
    for scheme in ["bf16", *args.schemes]:
        t0 = time.perf_counter()
        weights, kv = ("bf16", scheme) if scheme == "kv-fp8" else (scheme.split("+")[0], scheme.partition("+")[2])
        if kv:
            fp8_store = fp8_store or fp8_copy(model, bf16_store)
        store = fp8_store if kv else bf16_store
        try:
            dec = base if weights == "bf16" else quantized_copy(base, weights)
            dec.kv_dtype = "fp8" if kv else None  # the prefill check's cache
        except Exception as e:  # noqa: BLE001  (one scheme failing must not lose the others' numbers)
            res["schemes"][scheme] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(json.dumps({scheme: res["schemes"][scheme]}), flush=True)
            continue
        r = {"quantize_s": round(time.perf_counter() - t0, 2), "kv_GB": round(store.nbytes / GB, 3),
             "weights_estimate_GB": round((weight_bytes(shapes, None if weights == "bf16" else weights, 2)
                                           - weight_bytes({k: v for k, v in shapes.items()
                                                           if not k.startswith("decoder.")}, None, 2)) / GB, 3)}
        try:
            if weights != "bf16":
                r["kernel_check_rel_err"] = kernel_check(dec, weights)
            step = make_step(dec, store)
            r["weights_GB"] = round(stored_bytes(dec) / GB, 3)  # after the step's fusion (int4's scale copies)
            greedy = run_tokens(step, store, n, first, None, args.steps)
            if scheme == "bf16":
                ref_greedy = greedy
                ref_tokens = ref_greedy.argmax(-1).tolist()
                ref_forced = greedy
            else:
                forced = run_tokens(step, store, n, first, ref_tokens, args.steps)
                r["teacher_forced"] = compare(ref_forced, forced)
                mine = greedy.argmax(-1).tolist()
                same = next((i for i, (a, b) in enumerate(zip(mine, ref_tokens)) if a != b), len(mine))
                r["greedy_tokens_equal_before_divergence"] = same
                r["prefill_last_logits"] = compare(ref_prefill[None], prefill_logits(dec, args.prefill_tokens)[None])
            r["decode"] = time_decode(step, store, n, first_logits, args.steps, vocab)
            del step
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        res["schemes"][scheme] = r
        print(json.dumps({scheme: r}), flush=True)
        dec.kv_dtype = None
        if weights != "bf16":
            del dec
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(os.path.join(args.out_dir, "quant.json"), "w") as f:
            json.dump(res, f, indent=1)
    bf16 = res["schemes"]["bf16"].get("decode", {}).get("tokens_per_s")
    print(f"\n{'scheme':>6} {'weights GB':>10} {'tok/s':>7} {'x bf16':>6} {'forced top1':>11} {'rel err':>8}")
    for s, r in res["schemes"].items():
        tps = r.get("decode", {}).get("tokens_per_s")
        speed = f"{tps / bf16:.2f}" if tps and bf16 else ""
        tf = r.get("teacher_forced", {})
        print(f"{s:>6} {r.get('weights_GB', '')!s:>10} {tps!s:>7} {speed:>6} {tf.get('top1_agreement', '')!s:>11} "
              f"{tf.get('logit_rel_err', '')!s:>8}")
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(args.out_dir, "quant.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"total {res['total_s']} s")


if __name__ == "__main__":
    main()
