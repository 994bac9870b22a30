"""The fast decode step: static shapes, every input in a device tensor, captured once as a CUDA graph.

One token's step is ~30 matrix-vector products that read the 15 GB of weights, and a few hundred small kernels
in between; run eagerly, launching those kernels costs more than the products (issue 9: 24 ms of a 60 ms
step). Here the step reads its token, position and cache length from device tensors and writes its K/V into
the store's buffers at that position, so one graph, captured per KV store (a video's cache; kept for its
follow-up questions), replays every step. The small kernels are fused (`kernels.py`), q/k/v and gate/up are
each one product over weights laid side by side, and attention splits the keys across the whole GPU.
"""
from __future__ import annotations

import time
import weakref

import torch
import torch.nn.functional as F

from videoxl.language import quant
from videoxl.language.decoder import Qwen2Decoder, rope_cos_sin
from videoxl.language.kv_store import KVStore
from videoxl.decoding import kernels


def fuse_projections(decoder: Qwen2Decoder) -> list[tuple]:
    """Per layer: (qkv weight, qkv bias, gate_up weight), each one tensor whose row blocks ARE the separate
    projections' parameters (they become views into it), so nothing is stored twice and the eager path reads
    the same memory. Done once; later calls find the views already side by side. Quantized layers fuse into
    one `QuantLinear` each (qkv's bias inside it, None in the tuple's middle), the same way (`quant.fuse`)."""
    fused = []
    with torch.inference_mode(False), torch.no_grad():
        for layer in decoder.layers:
            a, m = layer.self_attn, layer.mlp
            if isinstance(a.q_proj, quant.QuantLinear):
                fused.append((quant.fuse_once([a.q_proj, a.k_proj, a.v_proj]), None,
                              quant.fuse_once([m.gate_proj, m.up_proj])))
                continue
            fused.append((_side_by_side([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                          _side_by_side([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                          _side_by_side([m.gate_proj.weight, m.up_proj.weight])))
    return fused


def _side_by_side(params: list[torch.nn.Parameter]) -> torch.Tensor:
    first = params[0]
    size = sum(p.numel() for p in params)
    storage = first.untyped_storage().data_ptr()
    adjacent = all(p.is_contiguous() and p.untyped_storage().data_ptr() == storage for p in params) and all(
        b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(params, params[1:]))
    if adjacent:
        row = first[0].numel() if first.ndim > 1 else 1
        return first.data.as_strided((size // row,) + tuple(first.shape[1:]), first.stride())
    whole = torch.cat([p.data for p in params])
    offset = 0
    for p in params:
        p.data = whole[offset:offset + p.shape[0]]
        offset += p.shape[0]
    return whole


def _linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """A fused weight is a tensor (F.linear) or quantized layers (a module, called)."""
    return weight(x) if isinstance(weight, torch.nn.Module) else F.linear(x, weight, bias)


class CapturedStep:
    """`step(token) -> logits [1, vocab]` (fp32) for a resident KV store, replaying one CUDA graph. The store's
    host-side length is left as it was; `finish(n)` records the n tokens the steps wrote."""

    def __init__(self, decoder: Qwen2Decoder, cache: KVStore):
        cfg = decoder.cfg
        # a weak reference: the step is kept per store (decoding._captured) and must not keep the store alive
        self.decoder, self.cache_ref, self.cfg = decoder, weakref.ref(cache), cfg
        self.buffers = cache.decode_buffers()
        self.weights = fuse_projections(decoder)
        dev = decoder.embed_tokens.weight.device
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.q = torch.empty(self.n_heads, self.head_dim, dtype=decoder.embed_tokens.weight.dtype, device=dev)
        # an FP8 store's token is rotated into this, then quantized into the store (kernels.rope_store_fp8)
        self.kv_tmp = torch.empty(2, self.n_kv, 1, self.head_dim, dtype=self.q.dtype, device=dev) \
            if cache.fp8 else None
        self.zero = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None
        self.logits = None
        self.capture_s = None

    def valid_for(self, cache: KVStore) -> bool:
        return cache is self.cache_ref() and all(
            mine[0].data_ptr() == now[0].data_ptr() for mine, now in zip(self.buffers, cache.decode_buffers()))

    def _body(self) -> torch.Tensor:
        d, cfg = self.decoder, self.cfg
        eps = cfg.rms_norm_eps
        length = (self.pos + 1).to(torch.int32)
        cos, sin = rope_cos_sin(self.pos, self.head_dim, cfg.rope_theta, self.q.dtype)
        h = F.embedding(self.token, d.embed_tokens.weight)  # [1, hidden]
        delta = None
        for i, layer in enumerate(d.layers):
            qkv_w, qkv_b, gate_up_w = self.weights[i]
            k_cache, v_cache, *scales = self.buffers[i]
            if delta is None:
                x = kernels.rms_norm(h, layer.input_layernorm.weight, eps)
            else:
                x, h = kernels.rms_norm(delta, layer.input_layernorm.weight, eps, residual=h)
            qkv = _linear(x, qkv_w, qkv_b)
            if scales:
                kernels.rope_store_fp8(qkv.view(-1, self.head_dim), cos[0], sin[0], self.pos, self.q, self.kv_tmp,
                                       self.zero, self.buffers[i], self.n_heads, self.n_kv, self.head_dim)
            else:
                kernels.rope_store(qkv.view(-1, self.head_dim), cos[0], sin[0], self.pos, self.q, k_cache, v_cache,
                                   self.n_heads, self.n_kv, self.head_dim)
            attn = kernels.decode_attention(self.q, k_cache, v_cache, length, scales=scales or None)
            o = layer.self_attn.o_proj(attn.view(1, -1))
            x, h = kernels.rms_norm(o, layer.post_attention_layernorm.weight, eps, residual=h)
            gate, up = _linear(x, gate_up_w, None).chunk(2, dim=-1)
            delta = layer.mlp.down_proj(F.silu(gate) * up)
        x, _ = kernels.rms_norm(delta, d.norm.weight, eps, residual=h)
        return d.lm_head(x).float()

    def capture(self) -> None:
        """Warm up (Triton compiles, cuBLAS picks its kernels) on a side stream, then capture. The warm-up
        writes a K/V at the current position, which the first real step overwrites."""
        t0 = time.perf_counter()
        self.pos.fill_(self.cache_ref().length)
        stream = torch.cuda.Stream(self.pos.device)
        stream.wait_stream(torch.cuda.current_stream(self.pos.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(self.pos.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # our own capture stream on the store's GPU: torch.cuda.graph's default one is made once per process, on
        # whichever GPU was current then, so a model on another GPU captured on a stream of the first (an empty
        # graph, and Triton refusing the other GPU's pointers: the second-GPU bug)
        # thread_local: a server runs one worker thread per GPU, and another worker's synchronising calls during
        # this capture invalidated it under the default "global" mode (cudaErrorStreamCaptureUnsupported, seen
        # with serve --devices cuda:0,cuda:1 on an H200 x2)
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.pos.device),
                              capture_error_mode="thread_local"):
            self.logits = self._body()
        torch.cuda.synchronize(self.pos.device)
        self.capture_s = time.perf_counter() - t0

    def start(self) -> None:
        """The next step writes at the store's current length."""
        self.pos.fill_(self.cache_ref().length)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token.view(1))
        self.graph.replay()
        self.pos.add_(1)
        return self.logits

    def finish(self, written: int) -> None:
        cache = self.cache_ref()
        cache.set_length(cache.length + written)
