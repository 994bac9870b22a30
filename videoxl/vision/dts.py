"""Dynamic Token Synthesis (the checkpoint's `model.sae`, class `SiglipAE` in the reference).

Fuses each group of 4 frames' 24x24 feature maps into one 24x24 map:
    + temporal_encoding -> [AttnBlock3D, TemporalAttention, SamePadConv3d (time 4->2)] x2 (time 2->1).
Module indices in `encoder` and every parameter name match the reference, so the released weights load.
Width C is `mm_hidden_size` (1152 released).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from videoxl.config import FRAMES_PER_GROUP

MAX_TEMPORAL_DISTANCE = 64  # relative-position tables hold 2*64+1 rows


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock3D(nn.Module):
    """Single-head spatial self-attention within each (group, time) slice, 1x1x1 convs, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv3d(c, c, kernel_size=1) for _ in range(4))

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.norm(x)
        # [b, c, t, h, w] -> [b*t, h*w, c]: one attention problem per time slice
        q, k, v = (p(y).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # scale c**-0.5
        out = out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(out)


class RelativePosition(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.embeddings_table = nn.Parameter(torch.zeros(2 * MAX_TEMPORAL_DISTANCE + 1, c))

    def forward(self, t: int) -> torch.Tensor:
        """[t, t, c]: entry [i, j] = table[clamp(j - i) + 64]."""
        r = torch.arange(t, device=self.embeddings_table.device)
        d = (r[None, :] - r[:, None]).clamp(-MAX_TEMPORAL_DISTANCE, MAX_TEMPORAL_DISTANCE)
        return self.embeddings_table[d + MAX_TEMPORAL_DISTANCE]


def pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-1 Conv1d on [n, c, t] as one GEMM over the channels. cuDNN ran these shapes (n = groups x 576,
    c = 1152, t = 4) at ~10 TFLOP/s on an H200, the largest single cost of the vision side after SigLIP."""
    return F.linear(x.transpose(1, 2), conv.weight[:, :, 0], conv.bias).transpose(1, 2)


class TemporalAttention(nn.Module):
    """Single-head attention along time at each spatial position, with relative-position terms."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.qkv = nn.Conv1d(c, 3 * c, kernel_size=1)
        self.relative_position_k = RelativePosition(c)
        self.relative_position_v = RelativePosition(c)
        self.proj_out = nn.Conv1d(c, c, kernel_size=1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)  # GroupNorm stats per spatial position
        q, k, v = pointwise(self.qkv, self.norm(seq)).chunk(3, dim=1)  # each [n, c, t]
        scale = c ** -0.25  # applied to q and k separately (fp16-friendly), as the weights were trained
        q, k = q * scale, k * scale
        weight = torch.einsum("nci,ncj->nij", q, k)
        # The trained key term is *transposed*: query i, key j gets q_j . table_k[i - j + 64]
        # (table_k[j - i] read at [j, i]); reproduce it, do not "fix" it.
        rel_k = self.relative_position_k(t)  # [t, t, c], [a, b] = table[b - a]
        weight = weight + torch.einsum("ncj,jic->nij", q, rel_k)
        attn = F.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = torch.einsum("nij,ncj->nci", attn, v)
        rel_v = self.relative_position_v(t)  # [i, j] = table[j - i]: the standard value term
        out = out + torch.einsum("nij,ijc->nci", attn, rel_v)
        out = pointwise(self.proj_out, out)
        return x + out.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)


class SamePadConv3d(nn.Module):
    """3x3x3 conv, stride 2 in time; replicate padding (H, W: 1/1; time: 1 before, 0 after) done in fp32."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv3d(c, c, kernel_size=3, stride=(2, 1, 1))

    def forward(self, x):
        padded = F.pad(x.float(), (1, 1, 1, 1, 1, 0), mode="replicate").to(x.dtype)
        return self.conv(padded)


class DTS(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.temporal_encoding = nn.Parameter(torch.zeros(FRAMES_PER_GROUP, c))
        self.encoder = nn.Sequential(AttnBlock3D(c), TemporalAttention(c), SamePadConv3d(c),
                                     AttnBlock3D(c), TemporalAttention(c), SamePadConv3d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [groups, c, 4, h, w] -> [groups, h*w, c] (row-major positions)."""
        x = x + self.temporal_encoding.t()[None, :, :, None, None]
        x = self.encoder(x)  # [groups, c, 1, h, w]
        return x.flatten(2).transpose(1, 2)


def frames_to_dts_input(features: torch.Tensor) -> torch.Tensor:
    """[frames, c, h, w] (frames a multiple of 4) -> [groups, c, 4, h, w] by a *raw view*, not a permute.

    The released weights were trained on this layout: DTS "channel" k of time slot s in group g holds
    frame 4g + k // (c/4), original channel 4*(k % (c/4)) + s. Reordering it "properly" would break them.
    """
    f, c, h, w = features.shape
    return features.contiguous().view(f // FRAMES_PER_GROUP, c, FRAMES_PER_GROUP, h, w)
