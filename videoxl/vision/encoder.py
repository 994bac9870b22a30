"""Frames -> visual tokens: SigLIP -> 27x27->24x24 resize -> pad to groups of 4 -> DTS -> projector -> 2x2 pool.

Every step works per frame or per group of 4 frames, so the frames can be encoded in slices (a multiple of 4
frames each) with the same result as all at once; `encode` does exactly that, which bounds the vision side's
peak memory by the slice, not by the video's length.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from videoxl.cancel import Cancel, check
from videoxl.config import DTS_GRID, FRAMES_PER_GROUP, VideoXLConfig
from videoxl.vision.dts import DTS, frames_to_dts_input
from videoxl.vision.siglip import SiglipVision

DTS_GROUPS_PER_CALL = 24  # the reference's DTS batch; bounds DTS attention memory (576x576 per slice)


def normalise(frames: np.ndarray | torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 [n, 384, 384, 3] -> [n, 3, 384, 384] scaled to [-1, 1] (SigLIP mean = std = 0.5)."""
    x = torch.as_tensor(frames).to(device=device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - 0.5) / 0.5).to(dtype)


def pad_to_groups(features: torch.Tensor) -> torch.Tensor:
    """Repeat the last frame until the count is a multiple of 4 (fewer than 4 frames: up to 4)."""
    missing = -features.shape[0] % FRAMES_PER_GROUP
    if missing:
        features = torch.cat([features, features[-1:].expand(missing, *features.shape[1:])], dim=0)
    return features


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VideoXLConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = SiglipVision(cfg.vision)
        self.dts = DTS(cfg.mm_hidden_size)
        h = cfg.text.hidden_size
        self.projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, h), nn.GELU(), nn.Linear(h, h))

    def patch_features(self, pixels: torch.Tensor, cancel: Cancel | None = None) -> torch.Tensor:
        """[n, 3, 384, 384] -> [n, c, 24, 24]: SigLIP, then bilinear resize of the patch grid in fp32."""
        feats = self.tower(pixels, cancel)
        n, p, c = feats.shape
        side = self.cfg.vision.grid
        grid = feats.view(n, side, side, c).permute(0, 3, 1, 2)
        return F.interpolate(grid.float(), size=(DTS_GRID, DTS_GRID), mode="bilinear",
                             align_corners=False).to(feats.dtype)

    def groups_to_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """[frames (multiple of 4), c, 24, 24] -> [groups, tokens_per_group, hidden]."""
        dts_in = frames_to_dts_input(features)
        fused = torch.cat([self.dts(chunk) for chunk in dts_in.split(DTS_GROUPS_PER_CALL)], dim=0)
        tokens = self.projector(fused)  # [g, 576, hidden]
        g, _, hid = tokens.shape
        grid = tokens.view(g, DTS_GRID, DTS_GRID, hid).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, self.cfg.mm_spatial_pool_stride)
        return pooled.permute(0, 2, 3, 1).reshape(g, -1, hid)

    def encode(self, frames: np.ndarray, frames_per_slice: int = 96,
               cancel: Cancel | None = None) -> Iterator[torch.Tensor]:
        """Yield visual tokens slice by slice (on a CPU group by group) ([groups, 144, hidden]) for uint8 frames
        [n, 384, 384, 3]. `frames_per_slice` must be a multiple of 4 so that groups never straddle slices."""
        assert frames_per_slice % FRAMES_PER_GROUP == 0
        p = self.tower.embeddings.patch_embedding.weight  # stays in the model's dtype (fp8 vision: precision.py)
        # On a CPU a slice runs a group at a time: groups are independent here and a CPU gains nothing from a
        # bigger batch, while `cancel` is then seen every fraction of a second (a 96-frame slice of the demo
        # model took seconds on two cores), not once per slice.
        step = FRAMES_PER_GROUP if p.device.type == "cpu" else frames_per_slice
        for start in range(0, len(frames), step):
            check(cancel)
            pixels = normalise(frames[start:start + step], p.device, p.dtype)
            feats = pad_to_groups(self.patch_features(pixels, cancel))
            yield self.groups_to_tokens(feats)

    def forward(self, frames: np.ndarray, frames_per_slice: int = 96) -> torch.Tensor:
        return torch.cat(list(self.encode(frames, frames_per_slice)), dim=0)
