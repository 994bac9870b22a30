"""Train the tiny demo model on the "shapes" task, end to end, through the inference modules.

    python -m videoxl.demo.train_tiny --out DIR [--init videoxl/demo/demo_model] [--minutes 11] [--export]

The model is `VideoXL(demo_config())`: the released architecture at tiny sizes (SigLIP 3 layers of which 2 run,
384-px input, DTS on the raw-view layout, 144 tokens per 4 frames, Qwen2 decoder 4 layers) with its own
byte-level BPE tokenizer carrying the Qwen special tokens. `train_step.forward` runs it (see there).

Curriculum: every step holds about `--frames` frames (B = frames // length videos of one length, so many
short videos or one long one); the longest length grows log-linearly from 24 s to 1024 s over the first `--grow`
(60 %) of the steps, lengths are drawn log-uniformly from [16, longest], and once 1024 s is in range it gets 15% of the
steps of its own. Prefixes of videos up to 256 s use a chunked-prefill block mask (4/1 or 16/4) a third of the
time, so the model does not lean on what chunked prefill hides. Frames get codec-like damage (gain/offset,
chroma subsampling, blur, noise sigma 0-10, random source size 160x120..640x480, bicubic resize to 384).
Every video is version 2 and every step asks all seven kinds. Training-only read-outs (`Probes`, never shipped)
and heavier weights on the slow kinds' answers (`--kind-weights`) speed up the skills the answer loss alone
learns slowly (the star's shape, the scene after it, the digit, the running ring count, the time of a group).
Resumes from DIR/ckpt (parts of <= 12 MB, tokenizer included), else starts from `--init` (a released folder);
stops after `--minutes` of wall time, sizing its schedule to `--budget-minutes` from the pace of its first 30
steps; then checkpoints, `--export`s DIR/model (the released folder format) and prints the held-out accuracy per
kind at every `--eval-lengths`. The shipped weights' exact recipe is in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from videoxl.demo import shapes
from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.config import TextConfig, VideoXLConfig, VisionConfig
from videoxl.language.prompt import ASSISTANT, END, SYSTEM, USER
from videoxl.demo.train_io import export, load_blob, load_init, save_blob
from videoxl.demo.train_step import Probes, Task, forward

VOCAB = 512
EVAL_VIDEOS = {64: 48, 256: 24, 1024: 8}  # held-out videos per length in the evals (times --eval-scale)


def demo_config() -> VideoXLConfig:
    text = TextConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0)
    vision = VisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4)
    return VideoXLConfig(text=text, vision=vision, mm_hidden_size=96)


def make_task_tokenizer(out_dir: str, saved: str | None = None):
    """Byte-level BPE on the task's own text, with the Qwen special tokens; answer words become single tokens.
    `saved`: a tokenizer.json string to restore instead."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from videoxl.checkpoint.tiny import SPECIAL_TOKENS

    if saved is not None:
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(saved), eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>")
        fast.save_pretrained(out_dir)
        return fast

    corpus = [SYSTEM + USER + ASSISTANT + END] * 50 + [f"Time {float(t)}s:" for t in range(0, 4000)]
    questions = list(shapes.QUESTIONS.values()) + list(shapes.V2_QUESTIONS.values())
    questions += [shapes.TIME_QUESTION.format(n=n) for n in range(0, 1024, 4)]
    corpus += questions * 200 + list(shapes.ANSWER_WORDS) * 500
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def augment(frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> uint8 [n, 384, 384, 3] with codec-like damage, resized as the video path does."""
    x = frames.permute(0, 3, 1, 2).float()
    dev = x.device
    x = x * torch.tensor(rng.uniform(0.9, 1.1, 3), device=dev, dtype=torch.float32)[None, :, None, None]
    x = x + torch.tensor(rng.uniform(-10, 10, 3), device=dev, dtype=torch.float32)[None, :, None, None]
    if rng.random() < 0.7:  # yuv420: chroma at half resolution
        m = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], device=dev)
        ycc = torch.einsum("ij,njhw->nihw", m, x)
        h, w = x.shape[2:]
        chroma = F.interpolate(F.avg_pool2d(ycc[:, 1:], 2, ceil_mode=True), size=(h, w), mode="bilinear")
        x = torch.einsum("ij,njhw->nihw", torch.linalg.inv(m), torch.cat([ycc[:, :1], chroma], 1))
    if rng.random() < 0.5:  # soft edges (codecs, anti-aliased drawing)
        sigma = rng.uniform(0.3, 1.2)
        r = torch.arange(-2, 3, device=dev, dtype=torch.float32)
        k = torch.exp(-r * r / (2 * sigma * sigma))
        k = (k / k.sum()).repeat(3, 1, 1)
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k[:, :, None, :], groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k[:, :, :, None], groups=3)
    x = F.interpolate(x.clamp(0, 255), size=(384, 384), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def train_video(rng: np.random.Generator, seconds: int) -> shapes.ShapesVideo:
    while True:  # version 2 with all seven kinds (a time question always fits at the lengths trained on)
        h = int(rng.integers(120, 481))
        w = int(np.clip(round(h * rng.uniform(1.0, 1.8)), 160, 640))
        v = shapes.sample_video(rng, seconds, w, h, noise=float(rng.uniform(0, 10)), seed=int(rng.integers(2**31)))
        if v.kinds == shapes.KINDS:
            return v


def schedule(step: int, total: int, rng: np.random.Generator, frames: int, grow: float = 0.6) -> tuple[int, int]:
    """(seconds, videos) for this step: the curriculum described at the top (`grow`: the share of the steps
    over which the longest length grows to 1024 s)."""
    longest = 24 * (1024 / 24) ** min(1.0, step / (grow * total))
    seconds = int(round(math.exp(rng.uniform(math.log(16), math.log(max(17.0, longest)))) / 4)) * 4
    seconds = max(16, min(1024, seconds))
    if longest >= 1024 and rng.random() < 0.15:
        seconds = 1024  # the longest length deserves its own share once it is in range
    return seconds, max(1, frames // seconds)


def time_offset(rng: np.random.Generator, seconds: int) -> int:
    """A random multiple of 4 s at which a `--time-offsets` step's timestamps start, its video still ending by
    1,024 s (so a 1,024-s video starts at 0)."""
    return 4 * int(rng.integers(0, (1024 - seconds) // 4 + 1))


def chunk_mask(task: Task, seconds: int, rng: np.random.Generator, device, offset: int = 0):
    if seconds > 256 or rng.random() > 1 / 3:
        return None
    c, s = ((4, 1), (16, 4))[int(rng.integers(2))]
    cfg = PrefillConfig.from_dict({"chunk_prefill_mode": "mask", "chunk_size": c, "step_size": s})
    return BlockPlan.from_prompt(task.prompts(seconds, offset)["needle"], cfg).dense_mask(device)


def heldout_frames(video: shapes.ShapesVideo, device) -> torch.Tensor:
    """A held-out video's 1-fps frames at 384x384, no damage beyond the generator's own noise."""
    x = shapes.frames_1fps(video, device).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(384, 384), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def evaluate(model, task: Task, seconds: int, count: int, frames: int, device) -> dict[str, float]:
    """First-answer-token accuracy per kind on held-out videos (seeds 0.. of `shapes.make_video`)."""
    model.eval()
    hits = {k: 0 for k in shapes.KINDS}
    per = max(1, frames // seconds)
    for s in range(0, count, per):
        videos = [shapes.make_video(i, seconds) for i in range(s, min(count, s + per))]
        x = torch.cat([heldout_frames(v, device) for v in videos])
        _, pred, want = forward(model, task, seconds, videos, x)
        ok = (pred == want).view(len(videos), len(shapes.KINDS)).sum(0).tolist()
        for k, n in zip(shapes.KINDS, ok):
            hits[k] += n
    model.train()
    return {k: round(h / count, 3) for k, h in hits.items()}


def eval_all(model, task, args, step: int, t0: float, log: list, lengths) -> None:
    for sec in lengths:
        n = max(1, int(EVAL_VIDEOS.get(sec, 3072 // sec) * args.eval_scale))
        acc = evaluate(model, task, sec, n, args.frames, next(model.parameters()).device)
        log.append({"step": step, "seconds": sec, "videos": n, "acc": acc, "t": round(time.time() - t0)})
        print(f"eval step {step} len {sec} n={n}: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for ckpt/ (resume), train_log.json, model/ (--export)")
    ap.add_argument("--init", default=None, help="start from this released folder (e.g. the shipped demo model) "
                    "when DIR has no checkpoint: its weights and tokenizer, a fresh optimizer, step 0")
    ap.add_argument("--minutes", type=float, default=9.0, help="stop (and checkpoint) after this wall time")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="total training time the schedule fits (default: --minutes)")
    ap.add_argument("--total-steps", type=int, default=0, help="fix the schedule length (0: from the budget)")
    ap.add_argument("--grow", type=float, default=0.6, help="share of the steps over which lengths reach 1024 s")
    ap.add_argument("--frames", type=int, default=1024, help="frames per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200, help="steps of linear LR warm-up")
    ap.add_argument("--head-warmup", type=int, default=0,
                    help="first train only the fresh read-outs for this many steps (with --init: their first, random "
                    "gradients would otherwise shake the trained weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-scale", type=float, default=1.0, help="scale the held-out set sizes (48/24/8)")
    ap.add_argument("--eval-lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--probes", type=int, default=1, help="1: train with the read-out losses (see Probes)")
    ap.add_argument("--previous-weight", type=float, default=1.0, help="weight of the previous-scene read-out")
    ap.add_argument("--v2-weight", type=float, default=0.3, help="weight of the digit/count/group read-outs")
    ap.add_argument("--kind-weights", nargs="*", default=["after=3", "digit=2", "count=2", "time=2"],
                    help="KIND=W: weight of a kind's answers in the loss (the slow-to-learn kinds more)")
    ap.add_argument("--time-offsets", type=float, default=0.0,
                    help="share of steps whose timestamps start at a random multiple of 4 s (0-1024 s), so `time` "
                         "must read the Time tokens, not the group's place")
    ap.add_argument("--try-lengths", type=int, nargs="*", default=[], help="lengths to try once before training")
    ap.add_argument("--export", action="store_true", help="also write DIR/model in the released format")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        args.kind_weights = {k: float(w) for k, w in (x.split("=") for x in args.kind_weights)}
    except ValueError:
        ap.error("--kind-weights takes KIND=WEIGHT pairs, e.g. after=3 time=2")
    if set(args.kind_weights) - set(shapes.KINDS):
        ap.error(f"--kind-weights: kinds are {', '.join(shapes.KINDS)}")
    if not 0.0 <= args.time_offsets <= 1.0:
        ap.error("--time-offsets is a share of the steps, from 0 to 1")
    args.budget_minutes = args.budget_minutes or args.minutes
    return args


def try_lengths(model, task, opt, args, dev) -> None:
    """One untimed forward + backward per length: does it fit, how long does it take."""
    for seconds in args.try_lengths:
        t = time.time()
        rng = np.random.default_rng([2, seconds])
        videos = [train_video(rng, seconds) for _ in range(max(1, args.frames // seconds))]
        loss, _, _ = forward(model, task, seconds, videos,
                             torch.cat([augment(shapes.frames_1fps(v, dev), rng) for v in videos]))
        loss.backward()
        opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
        print(f"try {seconds}s x{len(videos)}: {time.time() - t:.2f}s, peak {peak:.1f} GiB", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from videoxl.model import VideoXL

    t0, dev = time.time(), torch.device(args.device)
    cfg = demo_config()
    ckpt_path, model_dir = os.path.join(args.out, "ckpt", "state.pt"), os.path.join(args.out, "model")
    state = load_blob(ckpt_path) if os.path.isdir(os.path.dirname(ckpt_path)) else None
    init = load_init(args.init) if args.init and not state else None
    # the checkpoint carries its tokenizer: a `tokenizers` of another version might merge differently
    tokenizer = make_task_tokenizer(model_dir, state["tokenizer"] if state else init[1] if init else None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    model = VideoXL(cfg)
    for name, p in model.named_parameters():  # N(0, 1) embeddings would swamp the small residual streams
        if name.endswith(("embed_tokens.weight", "position_embedding.weight")):
            torch.nn.init.normal_(p, std=0.02)
    if init:
        model.load_state_dict(init[0])
        print(f"starting from the weights of {args.init}", flush=True)
    model.to(dev).train()
    probes = Probes(cfg.text.hidden_size, args.previous_weight, args.v2_weight).to(dev)
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, {"params": list(probes.parameters())}],
                            lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, total, log = 0, args.total_steps, []
    if state:
        model.load_state_dict(state["model"])
        probes.load_state_dict(state["probes"])
        opt.load_state_dict(state["opt"])
        step, total, log = state["step"], args.total_steps or state["total"], state["log"]
        print(f"resumed at step {step} of {total}", flush=True)
    task = Task(tokenizer, cfg)
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}; device {dev}"
          f" ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'})", flush=True)
    try_lengths(model, task, opt, args, dev)
    losses, t_run, first_step, evaluated = [], time.time(), step, -1
    while (total == 0 or step < total) and time.time() - t0 < args.minutes * 60:
        if total == 0 and step - first_step == 30:  # size the schedule to the budget from the measured pace
            total = step + int((args.budget_minutes * 60 * 0.85 - (time.time() - t0)) / ((time.time() - t_run) / 30))
            print(f"schedule: {total} steps", flush=True)
        rng = np.random.default_rng([0, args.seed, step])
        seconds, b = schedule(step, total or 10**9, rng, args.frames, args.grow)
        videos = [train_video(rng, seconds) for _ in range(b)]
        frames = torch.cat([augment(shapes.frames_1fps(v, dev), rng) for v in videos])
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(total, 1))))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (cosine if total else 1.0)
        model_lr = args.lr * min(1.0, max(0, step + 1 - args.head_warmup) / args.warmup) * (cosine if total else 1.0)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = model_lr, lr
        shifted = args.time_offsets > 0 and rng.random() < args.time_offsets  # (no draw when off: same runs)
        offset = time_offset(rng, seconds) if shifted else 0
        loss, _, _ = forward(model, task, seconds, videos, frames, chunk_mask(task, seconds, rng, dev, offset),
                             probes if args.probes else None, args.kind_weights, offset)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            rate = (time.time() - t_run) / (step - first_step)
            print(f"step {step}/{total} len {seconds} x{b} loss {np.mean(losses[-25:]):.4f} lr {model_lr:.2e} "
                  f"{rate:.2f}s/step t={time.time() - t0:.0f}s", flush=True)
        if args.eval_scale > 0 and step % args.eval_every == 0:
            longest = 24 * (1024 / 24) ** min(1.0, step / (args.grow * (total or 10**9)))
            eval_all(model, task, args, step, t0, log, [s for s in args.eval_lengths if s <= max(64, longest * 1.5)])
            evaluated = step
    save_blob({"model": model.state_dict(), "probes": probes.state_dict(), "opt": opt.state_dict(), "step": step,
               "total": total, "log": log, "tokenizer": tokenizer.backend_tokenizer.to_str()}, ckpt_path)
    if args.export:
        export(model, cfg, tokenizer, model_dir)
    if args.eval_scale > 0 and evaluated != step:  # the final held-out accuracy per kind, at every length
        eval_all(model, task, args, step, t0, log, args.eval_lengths)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({"step": step, "total": total, "args": {k: v for k, v in vars(args).items()}, "eval": log,
                   "losses": losses[-200:]}, f, indent=1)
    print(f"saved step {step} to {args.out} after {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
