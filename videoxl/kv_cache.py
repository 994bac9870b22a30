"""The KV cache: every decoder layer's keys and values for the tokens seen so far.

One object with a narrow interface: `append` (a layer's new keys/values, returns everything cached for that
layer), `length`, and `truncate` (keep a prefix: how a follow-up question reuses the video's KVs). Keys are
stored after RoPE at their absolute positions. Buffers grow geometrically so decoding does not reallocate per
token.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (1, num_kv_heads, capacity, head_dim)
        self._k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._len = [0] * num_layers

    @property
    def length(self) -> int:
        """Tokens cached in every layer (layer 0 leads during a forward pass; the last layer closes it)."""
        return self._len[-1]

    @property
    def capacity(self) -> int:
        return self._k[0].shape[2]

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens in every layer, so a known-length prefill + decode never reallocates."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        for i in range(self.num_layers):
            n = self._len[i]
            for buf in (self._k, self._v):
                grown = torch.empty((1, self.num_kv_heads, new_cap, self.head_dim), dtype=self.dtype,
                                    device=self.device)
                grown[:, :, :n] = buf[i][:, :, :n]
                buf[i] = grown

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `k`, `v` ([1, kv_heads, new, head_dim]) to `layer`; return that layer's whole cached K and V."""
        start = self._len[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            self.reserve(end)
        self._k[layer][:, :, start:end] = k
        self._v[layer][:, :, start:end] = v
        self._len[layer] = end
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (in every layer)."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self._len = [length] * self.num_layers

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._len[layer]
        return self._k[layer][:, :, :n], self._v[layer][:, :, :n]
