"""The local lmms-eval task `videoxl_shapes`: the synthetic "shapes" questions as a dataset, written here, no download.

    python -m videoxl.eval.shapes_task [--videos 40] [--seconds 16] [--out DIR]
    lmms-eval --model videoxl --model_args pretrained=$(python -c "import videoxl; print(videoxl.demo_model_path())") \\
        --tasks videoxl_shapes --include_path videoxl/eval/tasks/videoxl_shapes

Each held-out video (`shapes.make_video`, seeds from SEED) is written as a 1-fps mpeg4 file: the frames
`sample_fps=1` takes, and also every frame, so a server sampling `num_frames` frames evenly (lmms-eval's `openai`
model sends only that) sees the same frames as the plugin. One document per (video, question kind): every kind
a video has (`video.questions`), so kinds added to shapes.py are asked without a change here. Documents go into
`videoxl_shapes.json`; two tasks read it: `videoxl_shapes` (generated answers, the task's first-word rule) and
`videoxl_shapes_mc` (the answer chosen by log-likelihood among the words of its kind).

The shipped YAMLs read `data/videoxl_shapes.json` next to them (the default `--out`); with another `--out`,
YAMLs that include the shipped ones are written there too: point `--include_path` at that folder.
"""
from __future__ import annotations

import argparse
import json
import os

SEED = 200_000  # held-out seeds; bench/quality.py uses 100000.. (frames) and 150000.. (files)
TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks", "videoxl_shapes")
DATA_NAME = "videoxl_shapes.json"
TASKS = ("videoxl_shapes", "videoxl_shapes_mc")


def choices_for(answer: str, seen: list[str]) -> list[str]:
    """The words a multiple-choice question on this kind chooses among: colours, shapes, or (a kind whose
    answers are neither) every answer of that kind in the dataset."""
    from videoxl.demo import shapes

    for words in (list(shapes.COLOURS), list(shapes.SHAPES)):
        if answer in words:
            return words
    return sorted(set(seen))


def build(out: str | None = None, videos: int = 40, seconds: int = 16, kinds=None) -> str:
    """Write the videos and the JSON; returns the JSON's path."""
    from videoxl.demo import shapes

    out = os.path.abspath(out or os.path.join(TASK_DIR, "data"))
    unknown = [k for k in kinds or () if k not in shapes.KINDS]
    if unknown:
        raise SystemExit(f"unknown question kind(s) {unknown}; kinds: {', '.join(shapes.KINDS)}")
    docs = []
    for i in range(videos):
        seed = SEED + i
        video = shapes.make_video(seed, seconds)
        path = shapes.write_video(video, os.path.join(out, "videos", f"shapes-{seconds}s-{seed}.mp4"), fps=1)
        for kind, question in video.questions.items():  # this video's kinds: new ones come in with shapes.py
            if kinds is None or kind in kinds:
                docs.append({"id": f"{seed}-{kind}", "video": path, "seconds": seconds, "seed": seed, "kind": kind,
                             "question": question, "answer": video.answers[kind]})
    kinds = sorted({d["kind"] for d in docs})
    by_kind = {k: [d["answer"] for d in docs if d["kind"] == k] for k in kinds}
    for d in docs:
        d["choices"] = choices_for(d["answer"], by_kind[d["kind"]])
    data = os.path.join(out, DATA_NAME)
    with open(data, "w") as f:
        json.dump(docs, f, indent=1)
    if os.path.dirname(out) != TASK_DIR or os.path.basename(out) != "data":
        for task in TASKS:  # this folder becomes the --include_path: its YAMLs point at this JSON
            with open(os.path.join(out, f"{task}.yaml"), "w") as f:
                f.write(f"include: {os.path.join(TASK_DIR, task + '.yaml')}\n"
                        f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    return data


# ---- the task's functions (tasks/videoxl_shapes/utils.py re-exports them for lmms-eval's `!function`) ----
def doc_to_visual(doc) -> list[str]:
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def doc_to_choice(doc) -> list[str]:
    return doc["choices"]


def doc_to_target(doc) -> str:
    return doc["answer"]


def process_results(doc, results) -> dict:
    """The task's rule: `shapes.is_correct` (the answer's first word is the expected word)."""
    from videoxl.demo import shapes

    return {"acc": float(shapes.is_correct(results[0] if results else "", doc["answer"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--seconds", type=int, default=16)
    ap.add_argument("--kinds", nargs="+", default=None, help="question kinds (default: every kind each video has)")
    ap.add_argument("--out", default=None, help=f"folder (default: {os.path.join(TASK_DIR, 'data')})")
    args = ap.parse_args(argv)
    if args.videos < 1 or args.seconds < 12:
        raise SystemExit("--videos must be >= 1 and --seconds >= 12 (a shapes video has at least three scenes)")
    data = build(args.out, args.videos, args.seconds, args.kinds)
    folder = TASK_DIR if os.path.dirname(data) == os.path.join(TASK_DIR, "data") else os.path.dirname(data)
    print(f"wrote {data}\nrun: lmms-eval --model videoxl --model_args pretrained=PATH,preset=shapes "
          f"--tasks videoxl_shapes --include_path {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
