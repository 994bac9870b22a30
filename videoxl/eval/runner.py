"""The plugin's logic, free of lmms-eval: requests in, answers / log-probabilities out, grouped by video.

A request is anything with `.args`, the tuples lmms-eval's tasks build:

    generate_until             (context, gen_kwargs, doc_to_visual, doc_id, task, split)
    generate_until_multi_round (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)
    loglikelihood              (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)

and `docs(task, split, doc_id)` returns the document. Requests are run grouped by video (first-seen order), so
with the model's video KV cache holding only the latest video each video is still prefilled once across all its
questions; answers come back in the requests' order.
"""
from __future__ import annotations

import itertools
from typing import Callable

from videoxl.errors import VideoXLError
from videoxl.eval.scoring import score_continuations
from videoxl.eval.settings import EvalSettings
from videoxl.serving.engine import stop_cut

# lmms-eval generation_kwargs that mean something here; the rest (image_aspect_ratio, ...) are other models'
GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams", "repetition_penalty",
            "seed")


def generation_config(gen_kwargs: dict | None, settings: EvalSettings) -> tuple[dict, list[str]]:
    """lmms-eval's generation_kwargs -> (the model's generation_config, stop strings)."""
    g = dict(gen_kwargs or {})
    until = g.get("until") or []
    stops = [until] if isinstance(until, str) else [s for s in until if s]
    gen = {k: g[k] for k in GEN_KEYS if g.get(k) is not None}
    gen.setdefault("max_new_tokens", settings.max_new_tokens)
    if gen.get("temperature", 1.0) == 0:  # lmms-eval's greedy spelling
        gen["do_sample"] = False
        gen.pop("temperature")
    gen.setdefault("do_sample", False)
    if not gen["do_sample"]:
        gen.pop("top_p", None), gen.pop("top_k", None), gen.pop("temperature", None)
    return gen, stops


def video_of(visuals, where: str):
    """What a task's doc_to_visual gives -> what `chat` takes: one video path, or a list of images as frames."""
    if isinstance(visuals, (str, dict)):
        visuals = [visuals]
    if not visuals:
        raise VideoXLError(f"{where}: the task gives no video (doc_to_visual is empty); videoxl answers about videos")
    items = [v.get("path") or v.get("url") if isinstance(v, dict) else v for v in visuals]
    if len(items) == 1 and isinstance(items[0], str):
        return items[0]
    if any(isinstance(v, str) for v in items):
        raise VideoXLError(f"{where}: {len(items)} videos in one request; videoxl takes one video per question")
    return list(items)  # images: the frames of one video


class EvalRunner:
    def __init__(self, model, tokenizer, settings: EvalSettings, docs: Callable):
        self.model, self.tokenizer, self.settings, self.docs = model, tokenizer, settings, docs
        self.model_settings = settings.model_settings()  # validated now, not at the first question

    def chat(self, video, question: str, gen: dict, stops: list[str], history=None) -> str:
        s = self.settings
        answer = self.model.chat(video, self.tokenizer, question, chat_history=history, max_num_frames=s.frames,
                                 sample_fps=s.fps, max_sample_fps=s.max_fps, generation_config=gen,
                                 settings=self.model_settings)
        cut = stop_cut(answer, stops)
        return answer if cut is None else answer[:cut]

    def _by_video(self, requests, visual_at: int, doc_at: int) -> list[tuple[int, object, object]]:
        """(index, video, doc) for every request, ordered so that requests on the same video are adjacent."""
        rows, order = [], {}
        for i, req in enumerate(requests):
            args = req.args
            doc = self.docs(args[doc_at + 1], args[doc_at + 2], args[doc_at])
            video = video_of(args[visual_at](doc), f"{args[doc_at + 1]} doc {args[doc_at]}")
            key = video if isinstance(video, str) else ("doc", args[doc_at + 1], args[doc_at])
            rows.append((order.setdefault(key, len(order)), i, video, doc))
        return [(i, video, doc) for _, i, video, doc in sorted(rows, key=lambda r: (r[0], r[1]))]

    def generate_until(self, requests) -> list[str]:
        out: list = [None] * len(requests)
        for i, video, _ in self._by_video(requests, 2, 3):
            context, gen_kwargs = requests[i].args[:2]
            out[i] = self.chat(video, context, *generation_config(gen_kwargs, self.settings))
        return out

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """Round 0 asks the context; round k asks what the task's doc_to_text gives for it (lmms-eval's protocol:
        it returns (visuals, text, done, previous outputs, round info)). Each follow-up carries the conversation
        as chat history after the same video, so the video's KVs are reused, not prefilled again."""
        out: list = [None] * len(requests)
        for i, video, doc in self._by_video(requests, 2, 4):
            context, gen_kwargs, _, doc_to_text = requests[i].args[:4]
            gen, stops = generation_config(gen_kwargs, self.settings)
            history, answers, info = [], [], None
            question = context
            for round_idx in itertools.count(1):
                answer = self.chat(video, question, gen, stops, history)
                history.append((question, answer))
                answers.append(answer)
                visuals, question, done, _, info = doc_to_text(doc, previous_output=list(answers),
                                                               round_idx=round_idx, previous_round_info=info)
                if done:
                    break
                if visuals:  # a round may bring its own clip; without one the conversation stays on this video
                    video = video_of(visuals, f"doc {requests[i].args[4]} round {round_idx}")
            out[i] = answers
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(negative log-probability of the continuation, whether it is the greedy answer) per request.

        Negative: lmms-eval's multiple-choice scoring picks the option with the *smallest* first value (its models
        return a loss), whatever its docstring says. Requests sharing a video and a context (a question's
        options) are scored together: the context runs once, then each continuation after it."""
        for req in requests:
            if len(req.args) < 6:
                raise VideoXLError("loglikelihood without a video (acc_mutual_info's unconditional scores) is not "
                                   "supported: videoxl scores continuations given a video")
        out: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, str]]] = {}
        videos = {}
        for i, video, doc in self._by_video(requests, 2, 3):
            context, target = requests[i].args[:2]
            continuation = target(doc) if callable(target) else target
            if not isinstance(continuation, str):
                raise VideoXLError(f"loglikelihood: the continuation must be a string, got {continuation!r}")
            key = (video if isinstance(video, str) else i, context)
            videos[key] = video
            groups.setdefault(key, []).append((i, continuation))
        for key, items in groups.items():
            scores = score_continuations(self.model, self.tokenizer, videos[key], key[1], [c for _, c in items],
                                         self.settings.sampling, self.model_settings)
            for (i, _), (logprob, greedy) in zip(items, scores):
                out[i] = (-logprob, greedy)
        return out
