"""The lmms-eval model `videoxl` (imported by lmms-eval only): parses `--model_args`, loads the model, and hands
requests to `EvalRunner`.

A bad `--model_args` stops the run with one line (a SystemExit: lmms-eval prints a traceback for any other
error). Several GPUs: under `accelerate launch` / `torchrun` each process takes the GPU of its LOCAL_RANK and
lmms-eval gives each rank its share of the documents.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms

import videoxl
from videoxl.errors import VideoXLError
from videoxl.eval.runner import EvalRunner
from videoxl.eval.settings import parse_model_args


class VideoXLEval(lmms):
    is_simple = True

    def __init__(self, **model_args):
        super().__init__()
        try:
            settings = parse_model_args(model_args)
            world = int(os.environ.get("WORLD_SIZE", 1))
            if world > 1 and settings.device is None and torch.cuda.is_available():
                settings = replace(settings, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            model, tokenizer = videoxl.load(settings.pretrained, **settings.load_kwargs())
            self.runner = EvalRunner(model, tokenizer, settings, self._doc)
        except VideoXLError as e:
            raise SystemExit(f"videoxl: {e}") from None
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), world
        self.model, self.settings = model, settings

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests) -> list[str]:
        return self.runner.generate_until(requests)

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        return self.runner.generate_until_multi_round(requests)

    def loglikelihood(self, requests) -> list:
        # lmms-eval 0.7.3's evaluator passes every response through `unwrap_generation_output`, which turns a
        # (float, bool) tuple into its str(); wrapped in a GenerationResult the pair reaches the task intact
        return [GenerationResult(text=pair) for pair in self.runner.loglikelihood(requests)]
