"""`videoxl chat --demo`: the tiny model shipped in the package, trained on the synthetic "shapes" task.

With a VIDEO it answers the question about it; alone it draws a task video (version 2: into the cache folder, never
next to a model), asks the task's seven questions and prints each answer beside the expected one.
"""
from __future__ import annotations

import os
import random
import sys

from videoxl.demo import shapes
from videoxl.demo import cache_dir
from videoxl.errors import VideoXLError

NOTICE = ("[demo] a TINY model (2M parameters) trained on a synthetic task (coloured shapes, one star; questions "
          "about colours, shapes, the star's digit, rings and times), NOT Video-XL-2: it only knows that task's seven "
          "questions.")


def quiz(model, tokenizer, seconds: int = 64, seed: int | None = None, out=None,
         questions: list[str] | None = None) -> int:
    """Draw a task video, ask its seven questions (or `questions`); returns how many answers were right."""
    out = out or sys.stdout
    seed = random.randrange(10**6) if seed is None else seed
    video = shapes.make_video(seed, seconds)
    path = os.path.join(cache_dir(), f"shapes-{seconds}s-seed{seed}.mp4")
    if not os.path.exists(path):
        try:
            shapes.write_video(video, path + ".part.mp4")
            os.replace(path + ".part.mp4", path)
        except OSError as e:
            raise VideoXLError(f"cannot write the demo video in {cache_dir()}: {e}") from None
    print(f"video: {path} ({seconds} s, seed {seed}; scenes: "
          + ", ".join(f"{s.colour} {s.shape}" for s in video.scenes) + ")", file=out)
    right, kinds = 0, {q: k for k, q in video.questions.items()}
    questions = questions or list(video.questions.values())
    for question in questions:
        answer = model.chat(path, tokenizer, question, max_num_frames=seconds, sample_fps=1, max_sample_fps=None,
                            generation_config={"do_sample": False, "max_new_tokens": 8})
        if question not in kinds:
            print(f"{question}  answer: {answer.strip()}  (not one of the task's questions)", file=out)
            continue
        expected = video.answers[kinds[question]]
        right += shapes.is_correct(answer, expected)
        print(f"{question:55s} answer: {answer.strip():10s} expected: {expected:10s} "
              f"{'ok' if shapes.is_correct(answer, expected) else 'WRONG'}", file=out)
    print(f"{right}/{sum(q in kinds for q in questions)} right", file=out)
    return right
