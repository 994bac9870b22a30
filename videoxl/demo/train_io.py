"""Checkpoints of the demo model's training: a resumable state in parts small enough to come back from a device
(`save_blob` / `load_blob`), the released folder format (`export`), and the shipped weights as a starting point
(`load_init`)."""
from __future__ import annotations

import os

import torch

from videoxl.config import VideoXLConfig


def save_blob(obj, path: str, part_bytes: int = 12 * 2**20) -> None:
    """torch.save into parts of at most `part_bytes` (each file back from the device must stay under 16 MB)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for old in [f for f in os.listdir(os.path.dirname(path)) if f.startswith(os.path.basename(path) + ".")]:
        os.remove(os.path.join(os.path.dirname(path), old))
    for i in range(0, len(data), part_bytes):
        with open(f"{path}.{i // part_bytes:03d}", "wb") as f:
            f.write(data[i:i + part_bytes])


def load_blob(path: str):
    import io

    d, base = os.path.dirname(path), os.path.basename(path)
    parts = sorted(f for f in os.listdir(d) if f.startswith(base + "."))
    if not parts:
        return None
    data = b"".join(open(os.path.join(d, p), "rb").read() for p in parts)
    return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")


def export(model, cfg: VideoXLConfig, tokenizer, out_dir: str) -> None:
    """The released folder format (config.json, safetensors + index, tokenizer), loadable by `videoxl.load`."""
    from videoxl.checkpoint.tiny import save_checkpoint

    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(out_dir, cfg, state, shards=1)
    tokenizer.save_pretrained(out_dir)


def load_init(path: str):
    """(state dict, tokenizer.json string) of a released folder (e.g. the shipped demo model) to train on from."""
    import videoxl

    model, tok = videoxl.load(path, device="cpu", dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, tok.backend_tokenizer.to_str()
