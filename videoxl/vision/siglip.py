"""SigLIP vision encoder, as Video-XL-2 runs it: patch embedding + the first N-1 encoder layers, and nothing
after them (the reference deletes the last layer and never applies `post_layernorm` or the pooling head).

Parameter names follow `transformers`' `SiglipVisionModel.vision_model` (`embeddings.patch_embedding`,
`embeddings.position_embedding`, `encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out_proj},layer_norm2,
mlp.fc1,mlp.fc2}`), so the checkpoint's `model.vision_tower.vision_tower.vision_model.*` tensors load as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from videoxl.cancel import Cancel, check
from videoxl.config import VisionConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid * cfg.grid, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.layers_run))


class SiglipVision(nn.Module):
    """pixels [frames, 3, 384, 384] (normalised) -> patch features [frames, 729, hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)

    def forward(self, pixels: torch.Tensor, cancel: Cancel | None = None) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            check(cancel)
            x = layer(x)
        return x
