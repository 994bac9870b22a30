"""Plot bench/quality.py results: accuracy against the share of KVs kept, per question kind (columns) and length
(rows), one line per way of choosing the dense blocks (in-model, random, oracle) and compression; dense decoding
is the dashed line at share 1.

    python bench/plot_quality.py RESULTS.json [MORE.json ...] --out bench/quality_v2.png   (later files win)
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KINDS = ("needle", "first", "last", "after", "digit", "count", "time")
STYLE = {"model": ("tab:blue", "o"), "random": ("tab:red", "x"), "oracle": ("tab:green", "^")}


def plot(reports: list[dict], out: str) -> None:
    latest = {}
    for report in reports:  # a later report's row replaces an earlier one's at the same length and mode
        latest.update({(r["seconds"], r["mode"]): r for r in report["results"] if r.get("source") != "files"})
    rows = list(latest.values())
    lengths = sorted({r["seconds"] for r in rows})
    fig, axes = plt.subplots(len(lengths), len(KINDS), figsize=(2.4 * len(KINDS), 2.3 * len(lengths)),
                             sharex=True, sharey=True, squeeze=False)
    for i, seconds in enumerate(lengths):
        here = [r for r in rows if r["seconds"] == seconds]
        dense = next((r for r in here if r["mode"] == "dense"), None)
        for j, kind in enumerate(KINDS):
            ax = axes[i][j]
            if dense and kind in dense["acc"]:
                ax.axhline(dense["acc"][kind], color="grey", ls="--", lw=1, label="dense")
            for select, (colour, marker) in STYLE.items():
                for comp, ls in ((4, "-"), (16, ":")):
                    pts = sorted((r["kept_share"], r["acc"][kind]) for r in here if r.get("select") == select
                                 and r.get("compression") == comp and kind in r["acc"])
                    if pts:
                        ax.plot(*zip(*pts), ls=ls, marker=marker, color=colour, ms=4, label=f"{select} c{comp}")
            ax.set_ylim(-5, 105)
            ax.set_xlim(0, 1.05)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(kind)
            if j == 0:
                ax.set_ylabel(f"{seconds} s: accuracy %")
            if i == len(lengths) - 1:
                ax.set_xlabel("share of KVs kept")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    device = ", ".join(sorted({r.get("device", "?") for r in reports}))
    fig.suptitle(f"Demo model on held-out shapes v2 videos: bi-level decoding per way of choosing blocks ({device})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="bench/quality_v2.png")
    args = ap.parse_args(argv)
    plot([json.load(open(p)) for p in args.files], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
