"""One training step's forward pass through the inference modules, for `train_tiny`.

Frames -> `VisionEncoder` -> `build_prompt` (`Time {t}s:` before every 4 frames) -> `Qwen2Decoder`, with one
training-only piece: `TrainCache`, the decoder's cache interface without in-place buffers, so gradients flow.
The video prefix runs once per video and its keys/values are shared by its seven questions (`shapes.KINDS`); the
loss is on the answer tokens (and `<|im_end|>`) only.
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
        self.tok, self.cfg, self._cache, self._tails = tokenizer, cfg, {}, {}
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.placeholder = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        self.answer_ids = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in shapes.ANSWER_WORDS}

    def prompts(self, seconds: int, offset: int = 0):
        """The needle question's prompt for a video of `seconds` s whose timestamps start at `offset` s (its
        prefix is every question's prefix)."""
        if (seconds, offset) not in self._cache:
            ts = [float(t + offset) for t in range(seconds)]
            self._cache[seconds, offset] = {"needle": build_prompt(self.tok, shapes.QUESTIONS["needle"], ts,
                                                                   self.cfg.tokens_per_group, self.placeholder)}
        return self._cache[seconds, offset]

    def tail(self, question: str) -> list[int]:
        """The ids after the video (question, end of turn, assistant header): the same for every length."""
        if question not in self._tails:
            p = build_prompt(self.tok, question, [0.0, 1.0, 2.0, 3.0], self.cfg.tokens_per_group, self.placeholder)
            self._tails[question] = p.input_ids[p.video_end:]
        return self._tails[question]

    def tails(self, seconds: int, videos, device, offset: int = 0):
        """ids [7B, T], labels [7B, T] (-100 off the answer): question tail + answer + <|im_end|>. `offset`: the
        timestamps start there, so the time question names its second shifted by as much."""
        rows, labels = [], []
        for v in videos:
            if v.kinds != shapes.KINDS:
                raise ValueError("training needs version 2 videos with all seven question kinds")
            for k in shapes.KINDS:
                text = shapes.TIME_QUESTION.format(n=v.time_n + offset) if k == "time" else v.questions[k]
                q = self.tail(text)
                a = self.answer_ids[v.answers[k]] + [self.end]
                rows.append(q + a)
                labels.append([-100] * (len(q) - 1) + a + [-100])  # position i predicts token i+1
        n = max(map(len, rows))
        ids = torch.tensor([r + [self.pad] * (n - len(r)) for r in rows], device=device)
        lab = torch.tensor([(l + [-100] * n)[:n] for l in labels], device=device)
        return ids, lab


class Probes(torch.nn.Module):
    """Training-only linear read-outs (never shipped) that give the hard skills a dense signal, one label per
    group of 4 frames (that of its third frame). On the visual tokens: its shape (mean over the group's tokens;
    the star and the ring are small spatial differences the answer loss alone finds slowly) and, in the star's
    scene, the digit (max over the tokens: a detail 36 % of the star's height that lands in ~2x2 of the 12x12
    tokens, which a mean over all 144 would dilute; the vision side must keep it through the pooling). After
    `PROBE_LAYER` decoder layers: the shape of the scene before (the first hop of 'after'), how many ring scenes
    have begun so far (a running count, so 'count' is one read at the end) and the group's own index (the
    `Time` token before it, which 'time' must match against the question's number)."""

    PROBE_LAYER = 2
    MAX_GROUPS = 256  # 1024 s at 4 s a group

    def __init__(self, hidden: int, previous_weight: float = 1.0, v2_weight: float = 0.3):
        super().__init__()
        self.previous_weight, self.v2_weight = previous_weight, v2_weight
        self.shape = torch.nn.Linear(hidden, len(shapes.SHAPES))
        self.previous = torch.nn.Linear(hidden, len(shapes.SHAPES))
        self.digit = torch.nn.Linear(hidden, 10)
        self.count = torch.nn.Linear(hidden, 4)
        self.group = torch.nn.Linear(hidden, self.MAX_GROUPS)

    @staticmethod
    def labels(videos, seconds: int, device) -> dict[str, torch.Tensor]:
        out = {k: [] for k in ("shape", "previous", "digit", "count", "group")}
        for v in videos:
            starts = [s.start for s in v.scenes]
            for g in range(seconds // 4):
                i = int(np.searchsorted(starts, 4 * g + 2, side="right")) - 1
                scene = v.scenes[i]
                out["shape"].append(shapes.SHAPES.index(scene.shape))
                out["previous"].append(shapes.SHAPES.index(v.scenes[i - 1].shape) if i > 0 else -100)
                out["digit"].append(scene.digit if scene.shape == "star" else -100)
                out["count"].append(sum(s.shape == "ring" for s in v.scenes[:i + 1]))
                out["group"].append(min(g, Probes.MAX_GROUPS - 1))
        return {k: torch.tensor(x, device=device) for k, x in out.items()}

    def loss(self, tokens: torch.Tensor, hidden: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """tokens: the groups' visual tokens [B*G, 144, h]; hidden: their mean after PROBE_LAYER layers [B*G, h]."""
        def ce(logits, key):
            return F.cross_entropy(logits, labels[key], ignore_index=-100) if (labels[key] >= 0).any() else 0.0
        loss = 0.3 * ce(self.shape(tokens.mean(1)), "shape") + self.previous_weight * ce(self.previous(hidden),
                                                                                         "previous")
        return loss + self.v2_weight * (ce(self.digit(tokens).amax(1), "digit") + ce(self.count(hidden), "count")
                                        + ce(self.group(hidden), "group"))


def forward(model, task: Task, seconds: int, videos, frames: torch.Tensor, mask=None, probes: Probes | None = None,
            kind_weight: dict[str, float] | None = None, offset: int = 0):
    """Loss and first-answer-token predictions and labels ([7B], kind-major per video) for B version 2 videos of
    `seconds` s; frames uint8 [B*seconds, 384, 384, 3]. `offset`: the `Time` tokens start at that second (a clip
    cut from later in a stream), so where a group sits in the prompt no longer tells its time."""
    dev = frames.device
    cuda = dev.type == "cuda"
    seen = []
    hook = (model.decoder.layers[Probes.PROBE_LAYER - 1].register_forward_hook(lambda m, i, o: seen.append(o))
            if probes is not None else None)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            feats = model.vision.patch_features(normalise(frames, dev, torch.float32))
            tokens = model.vision.groups_to_tokens(feats)  # [B*G, 144, h]
            p = task.prompts(seconds, offset)["needle"]
            b = len(videos)
            ids = torch.tensor(p.input_ids[:p.video_end], device=dev)
            embeds = model.decoder.embed_tokens(ids)[None].repeat(b, 1, 1)
            pos = torch.tensor(p.visual_positions, device=dev)
            embeds[:, pos] = tokens.reshape(b, -1, tokens.shape[-1]).to(embeds.dtype)
            if cuda:
                embeds = embeds.to(torch.bfloat16)  # bf16 residual stream and RoPE tables, as bf16 inference runs
            cache = TrainCache(len(model.decoder.layers))
            model.decoder(embeds, cache, mask=mask, logits_for="none")
            ids, labels = task.tails(seconds, videos, dev, offset)
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
        hidden = seen[0][:, pos].float().reshape(-1, tokens.shape[1], tokens.shape[-1]).mean(1)  # [B*G, h]
        loss = loss + probes.loss(tokens.float(), hidden, Probes.labels(videos, seconds, dev))
    first = (labels != -100).int().argmax(1)  # first answer label position
    rows = torch.arange(len(ids), device=dev)
    return loss, logits[rows, first].argmax(-1), labels[rows, first]
