"""The lmms-eval plugin's logic without lmms-eval (requests duck-typed: anything with `.args`), on the demo model:
answers equal bench/quality.py's on the same videos, multi-round reuses the video's KVs, loglikelihood equals a
direct computation, the server route (the request lmms-eval's `openai` model sends) answers the same, and bad
`--model_args` are one line. tests/test_eval_lmms.py runs the same through lmms-eval itself where it is installed.
"""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import videoxl
from videoxl.errors import VideoXLError
from videoxl.eval import shapes_task
from videoxl.eval.runner import EvalRunner, generation_config
from videoxl.eval.settings import PRESETS, parse_model_args

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import quality  # noqa: E402

DEMO = videoxl.demo_model_path()
SECONDS = 12  # three groups of 4 frames: no padded frames in the direct computation


@pytest.fixture(scope="module")
def demo():
    return videoxl.load(DEMO)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """2 videos x every question kind, and the documents as lmms-eval's task_dict would hold them."""
    data = shapes_task.build(str(tmp_path_factory.mktemp("shapes")), videos=2, seconds=SECONDS)
    with open(data) as f:
        docs = json.load(f)
    return docs


def runner(demo, docs, **args):
    model, tok = demo
    settings = parse_model_args({"pretrained": DEMO, "preset": "shapes", **args})
    return EvalRunner(model, tok, settings, lambda task, split, i: docs[i])


def gen_requests(docs):
    """Kind-major order, as a task could list them: consecutive requests are on different videos."""
    order = sorted(range(len(docs)), key=lambda i: (docs[i]["kind"], docs[i]["seed"]))
    gen = {"max_new_tokens": 8, "do_sample": False, "temperature": 0, "until": ["\n\n"]}
    return order, [SimpleNamespace(args=(docs[i]["question"], dict(gen), shapes_task.doc_to_visual, i,
                                         "videoxl_shapes", "test")) for i in order]


@pytest.fixture(scope="module")
def expected(demo, task) -> dict[str, bool]:
    """bench/quality.py's way of asking (its `ask`), on the task's files: right or wrong per document."""
    model, tok = demo
    docs = task
    quality.dense(model)
    out = {}
    for d in docs:
        if d["kind"] == "needle":  # once per video: ask() asks every kind
            video = quality.shapes.make_video(d["seed"], d["seconds"])
            for kind, ok in quality.ask(model, tok, video, d["video"], d["seconds"]).items():
                out[f"{d['seed']}-{kind}"] = ok
    return out


def test_generate_until_equals_quality_and_prefills_each_video_once(demo, task, expected):
    run = runner(demo, task)
    order, requests = gen_requests(task)
    before = demo[0].kv_cache.counts["vision_runs"]
    answers = run.generate_until(requests)
    assert demo[0].kv_cache.counts["vision_runs"] - before == 2  # grouped by video: one prefill per video
    ours = {task[i]["id"]: quality.shapes.is_correct(a, task[i]["answer"]) for i, a in zip(order, answers)}
    assert ours == expected


def test_multi_round_reuses_the_video_kvs(demo, task):
    run = runner(demo, task)
    doc = task[0]
    kinds = list(quality.shapes.QUESTIONS)

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx == len(kinds):
            return None, None, True, previous_output, None
        return None, quality.shapes.QUESTIONS[kinds[round_idx]], False, previous_output, None

    req = SimpleNamespace(args=(quality.shapes.QUESTIONS[kinds[0]], {"max_new_tokens": 8}, shapes_task.doc_to_visual,
                                doc_to_text, 0, "t", "test"))
    counts = demo[0].kv_cache.counts
    runs, hits = counts["vision_runs"], counts["memory_hits"]
    [rounds] = run.generate_until_multi_round([req])
    assert len(rounds) == len(kinds)
    assert counts["vision_runs"] - runs <= 1  # the first round may find the video cached already
    assert counts["memory_hits"] - hits >= len(kinds) - 1
    # the last round saw the conversation: the same as chat with that history
    model, tok = demo
    history = list(zip([quality.shapes.QUESTIONS[k] for k in kinds[:-1]], rounds[:-1]))
    again = model.chat(doc["video"], tok, quality.shapes.QUESTIONS[kinds[-1]], chat_history=history,
                       max_num_frames=2048, sample_fps=1, generation_config={"max_new_tokens": 8})
    assert again == rounds[-1]


def direct_logprobs(demo, path, question, continuations) -> list[float]:
    """Each whole sequence (prompt with the video, question, continuation) in one dense forward from scratch."""
    from videoxl.language.prompt import build_prompt
    from videoxl.video.sources import load_video

    model, tok = demo
    out = []
    with torch.inference_mode():
        clip = load_video(path, max_num_frames=2048, sample_fps=1)
        assert len(clip.timestamps) % 4 == 0
        visual = model.encode_clip(clip)
        prompt = build_prompt(tok, question, clip.timestamps, model.config.tokens_per_group,
                              model._placeholder_id(tok))
        for continuation in continuations:
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
            embeds = torch.cat([model.embed_prompt(prompt, visual),
                                model.decoder.embed_tokens(torch.tensor(cont))[None]], dim=1)
            logits = model.decoder(embeds, model.decoder.new_cache(embeds.shape[1]), logits_for="all")[0]
            logp = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)
            out.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
    return out


def test_loglikelihood_equals_a_direct_computation(demo, task):
    run = runner(demo, task)
    doc = task[0]
    conts = doc["choices"][:3] + ["a red circle"]  # one token and several
    reqs = [SimpleNamespace(args=(doc["question"], c, shapes_task.doc_to_visual, 0, "t", "test")) for c in conts]
    out = run.loglikelihood(reqs)
    direct = direct_logprobs(demo, doc["video"], doc["question"], conts)
    assert [nll for nll, _ in out] == pytest.approx([-x for x in direct], abs=2e-4, rel=1e-4)
    # the greedy flag: the generated answer's first word is a greedy continuation
    answer = demo[0].chat(doc["video"], demo[1], doc["question"], max_num_frames=2048, sample_fps=1,
                          generation_config={"max_new_tokens": 1})
    [(_, greedy)] = run.loglikelihood([SimpleNamespace(args=(doc["question"], answer, shapes_task.doc_to_visual, 0,
                                                            "t", "test"))])
    assert greedy


def test_loglikelihood_picks_the_answer_as_the_task_scores_it(demo, task):
    """The multiple-choice rule lmms-eval applies (argmin of the first value) gives the right word here."""
    run = runner(demo, task)
    reqs, index = [], []
    for i, d in enumerate(task[:4]):
        for c in d["choices"]:
            reqs.append(SimpleNamespace(args=(d["question"], c, shapes_task.doc_to_visual, i, "t", "test")))
            index.append((i, c))
    out = run.loglikelihood(reqs)
    for i, d in enumerate(task[:4]):
        nll = {c: out[k][0] for k, (j, c) in enumerate(index) if j == i}
        assert min(nll, key=nll.get) == d["answer"]


def test_server_route_answers_as_quality(task, expected):
    """The request lmms-eval's `openai` model sends with pass_video_url=True: a file:// video_url and
    media_io_kwargs.video.num_frames in the body (its extra_body)."""
    from tests.serving_helpers import LiveServer

    server = LiveServer(DEMO, "--allowed-local-media-path", os.path.dirname(task[0]["video"]))
    try:
        client = server.client()
        ours = {}
        for d in task:
            r = client.chat.completions.create(
                model="tiny", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file://" + d["video"]}},
                                                       {"type": "text", "text": d["question"]}]}],
                extra_body={"media_io_kwargs": {"video": {"num_frames": d["seconds"]}}})
            ours[d["id"]] = quality.shapes.is_correct(r.choices[0].message.content, d["answer"])
    finally:
        server.stop()
    assert ours == expected


# ---- settings ------------------------------------------------------------------------------------------------
def test_model_args_presets_and_overrides():
    s = parse_model_args(f"pretrained={DEMO},preset=lvbench_chunk,offload=true,dtype=float32")
    assert (s.frames, s.fps, s.max_fps, s.block, s.prev, s.offload) == (600, 1.0, 4.0, 4, 11, True)
    assert s.prefill_config()["chunk_size"] == 48 and s.prefill_config()["step_size"] == 4
    s = parse_model_args({"pretrained": DEMO, "preset": "videomme_pure", "frames": 64, "fps": "none",
                          "batch_size": 1})  # lmms-eval's own extras are accepted
    assert (s.frames, s.fps, s.prefill_config()) == (64, None, None)
    assert {"videomme_pure", "mlvu_chunk", "longvideobench_chunk", "lvbench_chunk", "videomme_bilevel"} <= set(PRESETS)
    for name in PRESETS:
        parse_model_args({"pretrained": DEMO, "preset": name})


@pytest.mark.parametrize("args, says", [
    ("frames=10", "needs pretrained"),
    (f"pretrained={DEMO},frame=10", "unknown model_args key 'frame'"),
    (f"pretrained={DEMO},frames=ten", "frames must be an integer"),
    (f"pretrained={DEMO},fps=0", "fps must be in (0, 240]"),
    (f"pretrained={DEMO},offload=maybe", "offload must be true or false"),
    (f"pretrained={DEMO},preset=videomme", "unknown preset 'videomme'"),
    (f"pretrained={DEMO},chunk_prefill=fast", "chunk_prefill must be one of"),
    (f"pretrained={DEMO},bilevel_budget=0.25", "needs chunk_prefill"),
    (f"pretrained={DEMO},block", "key=value pairs"),
    ("pretrained=/no/such/folder", "is not a folder"),
    (f"pretrained={DEMO},kv_dtype=int8", "model_args kv_dtype must be 'fp8' or none"),
    (f"pretrained={DEMO},quantize=int3", "model_args quantize must be one of"),
])
def test_bad_model_args_are_one_line(args, says):
    with pytest.raises(VideoXLError) as e:
        parse_model_args(args)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_precision_model_args_reach_the_model():
    s = parse_model_args(f"pretrained={DEMO},kv_dtype=fp8,quantize=int8")
    assert s.load_kwargs() == {"device": None, "dtype": None, "kv_cache_gb": 0.0, "kv_cache_dir": None,
                               "quantize": "int8", "kv_dtype": "fp8"}  # what the plugin passes to videoxl.load
    model, _ = videoxl.load(DEMO, **dict(s.load_kwargs(), quantize=None, device="cpu"))
    assert model.decoder.kv_dtype == "fp8"


def test_generation_kwargs_map_to_the_models():
    s = parse_model_args({"pretrained": DEMO})
    assert generation_config({"until": ["\n\n"], "max_new_tokens": 8, "temperature": 0, "top_p": None,
                              "image_aspect_ratio": "pad"}, s) == ({"max_new_tokens": 8, "do_sample": False},
                                                                   ["\n\n"])
    assert generation_config(None, s) == ({"max_new_tokens": 256, "do_sample": False}, [])


def test_task_files_hold_the_frames_sample_fps_1_takes(task):
    """1-fps files: every frame is one `sample_fps=1` takes, so evenly spaced `num_frames` = all of them."""
    import av

    with av.open(task[0]["video"]) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == task[0]["seconds"]
    assert {"needle", "first", "last", "after"} <= {d["kind"] for d in task} <= set(quality.shapes.KINDS)
