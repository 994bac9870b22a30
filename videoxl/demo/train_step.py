"""One training step's forward pass through the inference modules, for `train_tiny`.

Frames -> `VisionEncoder` -> `build_prompt` (`Time {t}s:` before every 4 frames) -> `Qwen2Decoder`, with one
training-only piece: `TrainCache`, the decoder's cache interface without in-place buffers, so gradients flow.
The video prefix runs once per video and its keys/values are shared by the four questions; the loss is on the
answer tokens (and `<|im_end|>`) only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from videoxl.demo import shapes
from videoxl.config import VideoXLConfig
from videoxl.language.prompt import build_prompt
from videoxl.vision.encoder import normalise


class TrainCache:
    """The decoder's cache interface (`length`, `append`) without in-place buffers, so gradients flow."""

    def __init__(self, layers: int):
        self.k, self.v = [None] * layers, [None] * layers

    @property
    def length(self) -> int:
        return 0 if self.k[-1] is None else self.k[-1].shape[2]

    def append(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def repeat(self, n: int) -> "TrainCache":
        out = TrainCache(len(self.k))
        out.k = [k.repeat_interleave(n, 0) for k in self.k]
        out.v = [v.repeat_interleave(n, 0) for v in self.v]
        return out


class Task:
    """Prompt pieces per video length (same for every video of that length) and answer ids."""

    def __init__(self, tokenizer, cfg: VideoXLConfig):
        self.tok, self.cfg, self._cache = tokenizer, cfg, {}
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.placeholder = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        self.answer_ids = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in shapes.ANSWER_WORDS}

    def prompts(self, seconds: int):
        if seconds not in self._cache:
            ts = [float(t) for t in range(seconds)]
            built = {k: build_prompt(self.tok, q, ts, self.cfg.tokens_per_group, self.placeholder)
                     for k, q in shapes.QUESTIONS.items()}
            self._cache[seconds] = built
        return self._cache[seconds]

    def tails(self, seconds: int, videos, device):
        """ids [4B, T], labels [4B, T] (-100 off the answer): question tail + answer + <|im_end|>."""
        built = self.prompts(seconds)
        rows, labels = [], []
        for v in videos:
            for k in shapes.KINDS:
                p = built[k]
                q = p.input_ids[p.video_end:]
                a = self.answer_ids[v.answers[k]] + [self.end]
                rows.append(q + a)
                labels.append([-100] * (len(q) - 1) + a + [-100])  # position i predicts token i+1
        n = max(map(len, rows))
        ids = torch.tensor([r + [self.pad] * (n - len(r)) for r in rows], device=device)
        lab = torch.tensor([(l + [-100] * n)[:n] for l in labels], device=device)
        return ids, lab


class Probes(torch.nn.Module):
    """Training-only linear read-outs (never shipped) that give the two hard skills a dense signal: the visual
    tokens of a group name its shape (the star is a small spatial difference the answer loss alone found
    slowly), and after `PROBE_LAYER` decoder layers they name the shape of the scene before (the first hop of
    'after'). Labels are those of each group's third frame."""

    PROBE_LAYER = 2

    def __init__(self, hidden: int, previous_weight: float = 1.0):
        super().__init__()
        self.previous_weight = previous_weight
        self.shape = torch.nn.Linear(hidden, len(shapes.SHAPES))
        self.previous = torch.nn.Linear(hidden, len(shapes.SHAPES))

    @staticmethod
    def labels(videos, seconds: int, device):
        own, prev = [], []
        for v in videos:
            starts = [s.start for s in v.scenes]
            for g in range(seconds // 4):
                i = int(np.searchsorted(starts, 4 * g + 2, side="right")) - 1
                own.append(shapes.SHAPES.index(v.scenes[i].shape))
                prev.append(shapes.SHAPES.index(v.scenes[i - 1].shape) if i > 0 else -100)
        return torch.tensor(own, device=device), torch.tensor(prev, device=device)


def forward(model, task: Task, seconds: int, videos, frames: torch.Tensor, mask=None, probes: Probes | None = None,
            kind_weight: dict[str, float] | None = None):
    """Loss and first-answer-token logits for B videos of `seconds` s; frames uint8 [B*seconds, 384, 384, 3]."""
    dev = frames.device
    cuda = dev.type == "cuda"
    seen = []
    hook = (model.decoder.layers[Probes.PROBE_LAYER - 1].register_forward_hook(lambda m, i, o: seen.append(o))
            if probes is not None else None)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            feats = model.vision.patch_features(normalise(frames, dev, torch.float32))
            tokens = model.vision.groups_to_tokens(feats)  # [B*G, 144, h]
            p = task.prompts(seconds)["needle"]
            b = len(videos)
            ids = torch.tensor(p.input_ids[:p.video_end], device=dev)
            embeds = model.decoder.embed_tokens(ids)[None].repeat(b, 1, 1)
            pos = torch.tensor(p.visual_positions, device=dev)
            embeds[:, pos] = tokens.reshape(b, -1, tokens.shape[-1]).to(embeds.dtype)
            if cuda:
                embeds = embeds.to(torch.bfloat16)  # bf16 residual stream and RoPE tables, as bf16 inference runs
            cache = TrainCache(len(model.decoder.layers))
            model.decoder(embeds, cache, mask=mask, logits_for="none")
            ids, labels = task.tails(seconds, videos, dev)
            tail = model.decoder.embed_tokens(ids)
            logits = model.decoder(tail.to(embeds.dtype), cache.repeat(len(shapes.KINDS)), logits_for="all")
    finally:
        if hook is not None:
            hook.remove()
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    weight = torch.tensor([(kind_weight or {}).get(k, 1.0) for k in shapes.KINDS], device=dev).repeat(b)
    weight = (weight[:, None] * (labels != -100)).flatten()
    loss = (per_token * weight).sum() / weight.sum()
    if probes is not None:
        own, prev = Probes.labels(videos, seconds, dev)
        hidden = seen[0][:, pos].float().reshape(-1, tokens.shape[1], tokens.shape[-1]).mean(1)  # [B*G, h]
        loss = loss + 0.3 * F.cross_entropy(probes.shape(tokens.float().mean(1)), own)
        loss = loss + probes.previous_weight * F.cross_entropy(probes.previous(hidden), prev, ignore_index=-100)
    first = (labels != -100).int().argmax(1)  # first answer label position
    rows = torch.arange(len(ids), device=dev)
    return loss, logits[rows, first].argmax(-1), labels[rows, first]
