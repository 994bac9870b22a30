"""FlashInfer's decode attention against ours (decoding/kernels.py): one query token of the full-size decoder (28
query heads over 4 KV heads: group 7; 128 dims; batch 1) over a long cache, bf16 and fp8 KV (issue 22, item 2).

    python bench/flashinfer_decode.py --out fi_decode.json [--tokens 79133 387882] [--page-sizes 16 64] [--smoke]

* ours: kernels.decode_attention with ATTENTION_CONFIG's defaults; fp8 is kv_fp8's (e4m3, a scale per token).
* fi-tc: BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True), FlashInfer's tensor-core (FA2) decode path.
* fi-dec: its CUDA-core decode kernel, which dispatches groups 1, 2, 3, 4, 6, 8, 16 only: "fi-dec" records what it
  says to group 7, "fi-dec-pad8" runs it with the query padded to 32 heads (a zero query per group, dropped).
FlashInfer runs on its paged cache ("HND", one request, use_cuda_graph=True, plan() before the capture). Its fp8
KV takes ONE scalar scale per K and per V tensor (floats fixed in the graph), not one per token: its cache is
quantized here with each tensor's amax / 448. max_err: against torch SDPA in fp32 over the case's own dequantized
K/V; err_vs_bf16: against the bf16 K/V. Times as attn_sweep.py (a CUDA graph of 20 calls); GB/s counts the K/V
bytes read (and scales, page indices). jit_s: FlashInfer's builds, in parallel first; plan_s: each first plan().
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HEADS, KV_HEADS, DIM = 28, 4, 128
FP8_NOTE = ("FlashInfer fp8 KV: one scalar scale per K and per V tensor (k_scale/v_scale), not one per token "
            "as ours; its cache is quantized with each tensor's amax/448")


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def save(res: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def table(res: dict) -> None:
    print(f"{'tokens':>7} {'case':<12} {'kv':<4} {'page':>4} {'us':>8} {'GB/s':>7} {'max_err':>8} {'vs_bf16':>8}",
          " error")
    for r in res["runs"]:
        cells = [f"{r.get(k, ''):>{w}}" for k, w in (("us", 8), ("GB_s", 7), ("max_err", 8), ("err_vs_bf16", 8))]
        print(f"{r['tokens']:>7} {r['case']:<12} {r['kv']:<4} {r.get('page_size', ''):>4} {' '.join(cells)}  "
              f"{r.get('error', '')}")
    print(FP8_NOTE)


def reference(q, k, v):
    """fp32 SDPA of q [28, 128] over k, v [4, n, 128]: the 7 query heads of a KV head are its 'sequence'."""
    import torch.nn.functional as F
    out = F.scaled_dot_product_attention(q.float().view(1, KV_HEADS, HEADS // KV_HEADS, DIM), k.float()[None],
                                         v.float()[None])
    return out.reshape(HEADS, DIM)


def prebuild(torch) -> dict:
    """FlashInfer's four modules for these cases, built at once (each build is a ninja of a few nvcc calls)."""
    from concurrent.futures import ThreadPoolExecutor
    from flashinfer.jit.attention import modules as M
    bf = torch.bfloat16
    specs = []
    for kv in (bf, torch.float8_e4m3fn):
        specs.append(M.gen_batch_decode_module(bf, kv, bf, torch.int32, DIM, DIM, 0, False, False))
        specs.append(M._gen_batch_prefill_primary_module("fa2", bf, kv, bf, torch.int32, DIM, DIM, 0, *[False] * 3))

    def build(spec):
        t = time.time()
        try:
            spec.build()
            return spec.name, round(time.time() - t, 1)
        except Exception as e:  # noqa: BLE001  (recorded with nvcc's first errors; plan() tries again)
            return spec.name, " | ".join([one_line(e)] + [x for x in str(e).splitlines() if "error" in x][:3])
    start, out = time.time(), dict(ThreadPoolExecutor(len(specs)).map(build, specs))
    return {**out, "wall_s": round(time.time() - start, 1)}


def fi_case(fi, torch, ws, q, kc, vc, n, ps, tc, scales):
    """A planned CUDA-graph wrapper over one request's pages kc, vc [pages, 4, ps, 128] -> (call, plan seconds)."""
    dev, pages = q.device, kc.shape[0]
    indptr = torch.tensor([0, pages], dtype=torch.int32, device=dev)
    indices = torch.arange(pages, dtype=torch.int32, device=dev)
    last = torch.tensor([n - (pages - 1) * ps], dtype=torch.int32, device=dev)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "HND", True, tc, *map(torch.empty_like, (indptr, indices, last)),
                                              backend="fa2")  # (use_cuda_graph, use_tensor_cores, its buffers)
    t = time.time()
    w.plan(indptr, indices, last, q.shape[0], KV_HEADS, DIM, ps, q_data_type=torch.bfloat16, kv_data_type=kc.dtype)
    return (lambda: w.run(q[None], (kc, vc), k_scale=scales[0], v_scale=scales[1])[0]), round(time.time() - t, 1)


def paged(x, ps, torch):
    """[4, n, 128] -> FlashInfer's HND pages [ceil(n/ps), 4, ps, 128], the last page zero-padded."""
    pages = -(-x.shape[1] // ps)
    out = torch.zeros(KV_HEADS, pages * ps, DIM, dtype=x.dtype, device=x.device)
    out[:, :x.shape[1]] = x
    return out.view(KV_HEADS, pages, ps, DIM).permute(1, 0, 2, 3).contiguous()


def make_cases(n, page_sizes, fi, ws, torch, kernels, kv_fp8):
    """Random q [28, 128] and K/V [4, n, 128] -> (q, the bf16 reference, the cases to time)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(HEADS, DIM, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(KV_HEADS, n, DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
    length = torch.tensor([n], dtype=torch.int32, device=dev)
    (k8, ks), (v8, vs) = kv_fp8.quantize(k[None]), kv_fp8.quantize(v[None])
    k8, v8 = k8[0], v8[0]
    cases = [dict(case="ours", kv="bf16", fn=lambda: kernels.decode_attention(q, k, v, length), kv_ref=(k, v),
                  nbytes=4 * KV_HEADS * n * DIM),
             dict(case="ours", kv="fp8", fn=lambda: kernels.decode_attention(q, k8, v8, length, scales=(ks, vs)),
                  kv_ref=(kv_fp8.dequantize(k8, ks, torch.float32), kv_fp8.dequantize(v8, vs, torch.float32)),
                  nbytes=2 * KV_HEADS * n * DIM + 8 * n)]
    if not fi:
        return q, reference(q, k, v), cases
    fk, fv = k.abs().amax().item() / 448.0, v.abs().amax().item() / 448.0
    k8t, v8t = (k.float() / fk).to(torch.float8_e4m3fn), (v.float() / fv).to(torch.float8_e4m3fn)
    q32 = torch.cat((q.view(KV_HEADS, 7, DIM), torch.zeros_like(q[:KV_HEADS, None])), 1).view(32, DIM)
    flavours = {"bf16": ((k, v), (None, None), (k, v)),
                "fp8": ((k8t, v8t), (fk, fv), (k8t.float() * fk, v8t.float() * fv))}
    for ps in page_sizes:
        for kv, ((kk, vv), scales, kv_ref) in flavours.items():
            kc, vc = paged(kk, ps, torch), paged(vv, ps, torch)
            nbytes = 2 * KV_HEADS * n * DIM * kk.element_size() + 4 * kc.shape[0]
            for case, tc, qq in (("fi-tc", True, q), ("fi-dec", False, q), ("fi-dec-pad8", False, q32)):
                c = dict(case=case, kv=kv, page_size=ps, kv_ref=kv_ref, nbytes=nbytes)
                try:
                    fn, c["plan_s"] = fi_case(fi, torch, ws, qq, kc, vc, n, ps, tc, scales)
                    c["fn"] = (lambda f=fn: f().view(KV_HEADS, 8, DIM)[:, :7]) if qq is q32 else fn
                except Exception as e:  # noqa: BLE001  (group 7 on the decode kernel; a JIT failure)
                    c["error"] = one_line(e)
                cases.append(c)
    return q, reference(q, k, v), cases


def run_lengths(args, res, fi, torch) -> None:
    from attn_sweep import timed  # (bench/ is this script's folder: the same graph timing as the sweep)
    from videoxl.decoding import kernels
    from videoxl.language import kv_fp8
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda") if fi else None
    for n in args.tokens:
        q, ref_bf16, cases = make_cases(n, args.page_sizes, fi, ws, torch, kernels, kv_fp8)
        for c in cases:
            run = {"tokens": n, **{k: c[k] for k in ("case", "kv", "page_size", "plan_s", "error") if k in c}}
            if "fn" in c:
                try:
                    out = c["fn"]().reshape(HEADS, DIM).float()
                    run["max_err"] = round((out - reference(q, *c["kv_ref"])).abs().max().item(), 5)
                    run["err_vs_bf16"] = round((out - ref_bf16).abs().max().item(), 5)
                    s = timed(c["fn"])
                    run.update(us=round(s * 1e6, 1), GB_s=round(c["nbytes"] / s / 1e9, 1))
                except Exception as e:  # noqa: BLE001  (a kernel that fails to run or to be captured)
                    run["error"] = one_line(e)
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
            save(res, args.out)
        cases = None  # (frees this length's caches before the next is made)
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fi_decode.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[79133, 387882])
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--smoke", action="store_true", help="parse the arguments and write an empty result (no GPU)")
    args = ap.parse_args()
    env = {k: os.environ.get(k) for k in ("CUDA_HOME", "FLASHINFER_CUDA_ARCH_LIST", "FLASHINFER_WORKSPACE_BASE")}
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "fp8_note": FP8_NOTE, "runs": [],
           "env": {**env, "nvcc": shutil.which("nvcc")}}
    if args.smoke:
        save(res, args.out)
        table(res)
        return 0
    try:
        import torch
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        res.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
        fi = None
        try:
            import flashinfer as fi
            res["flashinfer"] = fi.__version__
        except Exception as e:  # noqa: BLE001  (no FlashInfer: ours is still measured)
            res["flashinfer_error"] = one_line(e)
        if fi:
            try:
                res["jit_s"] = prebuild(torch)
            except Exception as e:  # noqa: BLE001  (its internals moved: plan() still builds what it needs)
                res["jit_error"] = one_line(e)
        save(res, args.out)
        run_lengths(args, res, fi, torch)
    except Exception as e:  # noqa: BLE001  (whatever was measured is kept)
        res["error"] = one_line(e)
    save(res, args.out)
    table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
