"""The lmms-eval plugin against bench/quality.py on the local task's videos: the same answers, video by video, and
the plugin's overhead over `model.chat` on the same requests.

    python bench/eval_plugin.py [--videos 40] [--seconds 16] [--repeats 2] [--server] [--json out.json]

The videos are the `videoxl_shapes` task's (videoxl/eval/shapes_task.py: held-out seeds, 1-fps mpeg4 files).
"chat" asks them as quality.py does (`quality.ask`: a video's questions one after the other, model.chat with
sample_fps=1); "plugin" gives the same documents to the plugin's runner as lmms-eval would (kind-major order,
so it has to group them by video itself). Each side runs `--repeats` times, alternating; the fastest run of
each is compared. `--server` also asks through a live `videoxl serve` with the request lmms-eval's `openai`
model sends (file:// video_url, media_io_kwargs.video.num_frames).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import quality  # noqa: E402
import videoxl  # noqa: E402
from videoxl.eval import shapes_task  # noqa: E402
from videoxl.eval.runner import EvalRunner  # noqa: E402
from videoxl.eval.settings import parse_model_args  # noqa: E402

GEN = {"max_new_tokens": 8, "do_sample": False, "temperature": 0, "until": ["\n\n"]}


def by_chat(model, tok, docs) -> dict[str, bool]:
    out = {}
    for d in docs:
        if d["kind"] == "needle":  # quality.ask asks all kinds of this video
            video = quality.shapes.make_video(d["seed"], d["seconds"])
            for kind, ok in quality.ask(model, tok, video, d["video"], d["seconds"]).items():
                out[f"{d['seed']}-{kind}"] = ok
    return out


def by_plugin(runner, docs) -> dict[str, bool]:
    order = sorted(range(len(docs)), key=lambda i: (docs[i]["kind"], docs[i]["seed"]))
    reqs = [SimpleNamespace(args=(docs[i]["question"], dict(GEN), shapes_task.doc_to_visual, i, "t", "test"))
            for i in order]
    answers = runner.generate_until(reqs)
    return {docs[i]["id"]: quality.shapes.is_correct(a, docs[i]["answer"]) for i, a in zip(order, answers)}


def by_server(model_dir, docs, folder) -> dict[str, bool]:
    from tests.serving_helpers import LiveServer

    server = LiveServer(model_dir, "--allowed-local-media-path", folder)
    try:
        client, out = server.client(), {}
        for d in docs:
            r = client.chat.completions.create(
                model="tiny", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": "file://" + d["video"]}},
                    {"type": "text", "text": d["question"]}]}],
                extra_body={"media_io_kwargs": {"video": {"num_frames": d["seconds"]}}})
            out[d["id"]] = quality.shapes.is_correct(r.choices[0].message.content, d["answer"])
        return out
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--seconds", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--server", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model_dir = videoxl.demo_model_path()
    model, tok = videoxl.load(model_dir)
    settings = parse_model_args({"pretrained": model_dir, "preset": "shapes"})
    runner = EvalRunner(model, tok, settings, None)
    with tempfile.TemporaryDirectory() as tmp:
        with open(shapes_task.build(tmp, args.videos, args.seconds)) as f:
            docs = json.load(f)
        runner.docs = lambda task, split, i: docs[i]
        times, results = {"chat": [], "plugin": []}, {}
        for _ in range(args.repeats):
            for name, run in (("chat", lambda: by_chat(model, tok, docs)), ("plugin", lambda: by_plugin(runner, docs))):
                t0 = time.perf_counter()
                results[name] = run()
                times[name].append(time.perf_counter() - t0)
        if args.server:
            results["server"] = by_server(model_dir, docs, tmp)
    chat, plugin = min(times["chat"]), min(times["plugin"])
    report = {"videos": args.videos, "seconds": args.seconds, "documents": len(docs),
              "accuracy": {k: round(100 * sum(v.values()) / len(v), 2) for k, v in results.items()},
              "same_as_chat": {k: v == results["chat"] for k, v in results.items() if k != "chat"},
              "chat_s": [round(t, 2) for t in times["chat"]], "plugin_s": [round(t, 2) for t in times["plugin"]],
              "overhead_pct": round(100 * (plugin - chat) / chat, 2)}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(report["same_as_chat"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
