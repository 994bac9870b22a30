"""Plot bench/prefill.py results: vision+prefill time and peak GPU memory against frame count, per way.

    python bench/plot.py OLDER.json NEWER.json ... --out bench/prefill.png   (later files win)
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="bench/prefill.png")
    args = ap.parse_args()
    latest, device = {}, set()
    for path in args.files:  # a later file's run replaces an earlier one's at the same size and way
        data = json.load(open(path))
        latest.update({(r["frames"], r["way"]): r for r in data["runs"]})
        device.add(data["device"])
    runs = list(latest.values())
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for way in ("dense", "mask", "streaming", "hf"):
        pts = sorted((r["frames"], r) for r in runs if r["way"] == way and r["seconds"] != "OOM")
        label = {"dense": "ours, dense", "mask": "ours, mask (block-sparse)", "streaming": "ours, streaming+offload",
                 "hf": "transformers Qwen2 (SDPA)"}[way]
        ax_t.plot([f for f, _ in pts], [r["seconds"] for _, r in pts], "o-", label=label)
        ax_m.plot([f for f, _ in pts], [r["peak_gb"] for _, r in pts], "o-", label=label)
    for ax, title in ((ax_t, "vision + prefill time (s)"), (ax_m, "peak GPU memory (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("frames")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_m.axhline(80, color="grey", ls="--", lw=1)
    ax_m.text(260, 81, "80 GB (H100)", color="grey", fontsize=8)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"Video-XL-2 full size, random bf16 weights, {', '.join(sorted(device))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
