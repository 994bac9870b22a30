"""Why NVDEC failed inside `chat` for the full-size model, and that the fix holds (GPU; one subprocess per case).

FFmpeg's CUDA device in "primary context" mode (PyAV's default with `is_hw_owned=True`) insists that the
device's primary context runs with CU_CTX_SCHED_BLOCKING_SYNC; if torch already made that context active with
its own flags, `av_hwdevice_ctx_create` fails with ENOTSUP (errno 95, "Operation not supported"). Each case
prints the primary context's state as the driver reports it, and whether NVDEC decodes.

    python bench/nvdec_context.py [--out results.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

CASES = ("nvdec_first", "small_alloc_then_primary", "big_alloc_then_primary", "big_alloc_then_shared",
         "big_alloc_then_shared_in_thread", "videoxl_open_after_big_alloc")


def primary_state(index: int = 0) -> dict:
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuInit(0)
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    cuda.cuDeviceGet(ctypes.byref(dev), index)
    cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
    return {"flags": flags.value, "active": active.value}


def make_video(path: str) -> None:
    import av
    import numpy as np
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(60):
            img = rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode(path: str, options: dict | None) -> str:
    import av
    from av.codec.hwaccel import HWAccel
    accel = HWAccel("cuda", device="0", allow_software_fallback=False, is_hw_owned=True, options=options)
    try:
        with av.open(path, hwaccel=accel) as c:
            n = sum(1 for f in c.decode(video=0) if f.format.name == "cuda")
        return f"ok: {n} CUDA frames"
    except Exception as e:  # the point is to see it
        return f"failed: {type(e).__name__}: {e}"


def run_case(case: str, path: str) -> dict:
    import torch
    out = {"case": case, "before": primary_state()}
    if case == "nvdec_first":
        out["nvdec"] = decode(path, None)
        torch.empty(16 * 2**30, dtype=torch.uint8, device="cuda")
    elif case == "small_alloc_then_primary":
        torch.zeros(1, device="cuda")
        out["after_torch"] = primary_state()
        out["nvdec"] = decode(path, None)
    elif case.startswith("big_alloc"):
        x = torch.empty(16 * 2**30, dtype=torch.uint8, device="cuda")
        out["after_torch"] = primary_state()
        if case == "big_alloc_then_primary":
            out["nvdec"] = decode(path, None)
        elif case == "big_alloc_then_shared":
            out["nvdec"] = decode(path, {"primary_ctx": "0", "current_ctx": "1"})
        else:
            import threading
            box = {}

            def work():
                torch.cuda.set_device(0)  # the thread's current context: torch's primary one
                box["r"] = decode(path, {"primary_ctx": "0", "current_ctx": "1"})
            t = threading.Thread(target=work)
            t.start(), t.join()
            out["nvdec"] = box["r"]
        del x
    elif case == "videoxl_open_after_big_alloc":
        x = torch.empty(16 * 2**30, dtype=torch.uint8, device="cuda")
        from videoxl.video.sources import open_video
        stream = open_video(path, 16, None, None, device=torch.device("cuda:0"))
        frames = [f for batch in stream.batches(8) for f in batch]
        out["nvdec"] = {k: v for k, v in stream.stats.items() if "nvdec" in k or k == "video_decoder"}
        out["frames"] = len(frames)
        del x
    out["after"] = primary_state()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--case", default=None)
    ap.add_argument("--video", default=None)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, a.video)))
        return
    path = os.path.join(tempfile.mkdtemp(), "probe.mp4")
    make_video(path)
    results = []
    for case in CASES:
        p = subprocess.run([sys.executable, __file__, "--case", case, "--video", path], capture_output=True,
                           text=True, timeout=300)
        line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else None
        r = json.loads(line) if line and line.startswith("{") else {"case": case, "error": p.stderr[-1500:]}
        results.append(r)
        print(json.dumps(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
