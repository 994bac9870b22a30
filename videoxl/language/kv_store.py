"""The KV store: every decoder layer's keys and values, on the GPU or offloaded to (pinned) CPU memory.

One object, a narrow interface:
  * `append(layer, k, v)` -> the layer's whole K/V on the compute device (what an attention step reads);
  * `layer_slot(layer, n)` / `commit(layer, n)` -> write a whole layer's first n positions at once (chunked
    prefill computes a layer at a time) and, with offload, send it to the CPU behind the next layer's compute;
  * `length`, `truncate(n)` (keep a prefix: how a follow-up question reuses the video's KVs), `reserve(n)`;
  * `plan`: the block layout of the prefilled video (which tokens are timestamps, which visual, block spans),
    recorded for the decoding strategies that read blocks.
Keys are stored after RoPE at their absolute positions. Nothing else reaches into the buffers.

With `offload=True` the buffers live in CPU memory (pinned when a GPU is present) and a layer's K/V travels to
the GPU when it is read, the next layer's copy overlapping the current layer's compute on a side stream.

With `kv_dtype="fp8"` each layer's buffers are e4m3 keys and values plus a scale per token (language/kv_fp8.py):
they are written quantized and read back in the model's dtype (`dtype`), so callers see no difference but the
bytes. A layer's "parts" are (K, V) or, in fp8, (K, V, K scales, V scales), wherever they live.
"""
from __future__ import annotations

import torch

from videoxl.language import kv_fp8


class KVStore:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256, offload: bool = False, kv_dtype: str | None = None):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.offload = dtype, torch.device(device), offload
        self.kv_dtype = kv_fp8.parse_kv_dtype(kv_dtype)  # None: stored in `dtype`
        self.fp8 = self.kv_dtype == "fp8"
        self.home = torch.device("cpu") if offload else self.device
        self._pin = offload and self.device.type == "cuda"
        self._capacity = capacity
        # Offloaded (pinned) buffers are made when a layer is first written: pinning ~20 GB of host memory up
        # front stalls for seconds, while one layer at a time hides behind the GPU's work on the layer before.
        self._parts: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers
        if not offload:
            for i in range(num_layers):
                self._home(i)
        self._len = [0] * num_layers
        self.plan = None  # chunking.BlockPlan of the prefilled video, when chunk prefill made it
        cuda = offload and self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._scratch: dict[int, tuple[torch.Tensor, ...]] = {}  # GPU staging (parts), two slots
        self._fetched: dict[int, tuple[int, torch.cuda.Event | None]] = {}  # layer -> (slot, copy done)
        self._written: tuple[torch.Tensor, torch.Tensor] | None = None  # fp8: layer_slot's buffers, model dtype

    def _empty(self, capacity: int, device=None, pin=None) -> tuple[torch.Tensor, ...]:
        device, pin = device or self.home, self._pin if pin is None else pin
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        stored = kv_fp8.FP8 if self.fp8 else self.dtype
        parts = [torch.empty(shape, dtype=stored, device=device, pin_memory=pin) for _ in range(2)]
        if self.fp8:
            parts += [torch.empty((capacity,), dtype=torch.float32, device=device, pin_memory=pin) for _ in range(2)]
        return tuple(parts)

    def _home(self, layer: int) -> tuple[torch.Tensor, ...]:
        if self._parts[layer] is None:
            self._parts[layer] = self._empty(self._capacity)
        return self._parts[layer]

    def _write(self, parts: tuple, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[2]
        if not self.fp8:
            parts[0][:, :, start:end], parts[1][:, :, start:end] = k, v
            return
        for i, x in enumerate((k, v)):
            q, scale = kv_fp8.quantize(x)
            parts[i][:, :, start:end], parts[2 + i][start:end] = q, scale

    def _read(self, parts: tuple, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [1, heads, end, d] in the model's dtype: views of the buffers, or (fp8) dequantized copies."""
        if not self.fp8:
            return parts[0][:, :, :end], parts[1][:, :, :end]
        return tuple(kv_fp8.dequantize(parts[i][:, :, :end], parts[2 + i][:end], self.dtype) for i in range(2))

    # ---- sizes ----------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens cached in every layer (layer 0 leads during a forward pass; the last layer closes it)."""
        return self._len[-1]

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V buffers (and fp8 scales) at full capacity, wherever they live."""
        if self.fp8:
            return kv_fp8.bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim) * self._capacity
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self._capacity * self.dtype.itemsize

    def reserve(self, total: int) -> None:
        """Room for `total` tokens in every layer, so a known-length prefill + decode never reallocates."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        for i in range(self.num_layers):
            if self._parts[i] is None:
                continue
            grown = self._empty(new_cap)
            for new, old in zip(grown, self._parts[i]):
                copy_prefix(new, old, self._len[i])  # stream-ordered on a GPU: the old buffers may go at once
            self._parts[i] = grown
        self._capacity = new_cap
        self._scratch.clear()
        self._fetched.clear()

    def set_length(self, length: int) -> None:
        """Every layer holds `length` tokens: after a captured decode step wrote positions on the device (see
        `decode_buffers`), or to drop them. Growing past what was written exposes whatever the buffer holds."""
        if length < 0 or length > self.capacity:
            raise ValueError(f"cannot set a store of capacity {self.capacity} to {length} tokens")
        self._len = [length] * self.num_layers
        self._fetched.clear()

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (in every layer)."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot truncate a store of {self.length} tokens to {length}")
        self._len = [length] * self.num_layers
        self._fetched.clear()

    # ---- token-by-token access (dense prefill, decoding) -----------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `k`, `v` ([1, kv_heads, new, head_dim]) to `layer`; return that layer's whole K and V (as stored:
        an fp8 store hands back the new tokens quantized too, as every later reader sees them)."""
        start = self._len[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            self.reserve(end)
        self._write(self._home(layer), start, k, v)
        self._len[layer] = end
        if not self.offload or self._copy_stream is None:  # (offload without a GPU: home is compute memory)
            return self._read(self._home(layer), end)
        slot, done = self._fetched.pop(layer, (None, None))
        if slot is None:  # not prefetched: copy now
            slot, done = self._fetch(layer, start)
        torch.cuda.current_stream(self.device).wait_event(done)
        staging = self._scratch[slot]
        self._write(staging, start, k, v)  # the new tokens are already on the GPU
        if layer + 1 < self.num_layers:  # overlap the next layer's copy with this layer's attention
            self._fetched[layer + 1] = self._fetch(layer + 1, self._len[layer + 1])
        return self._read(staging, end)

    def _staging(self, layer: int) -> tuple[int, tuple[torch.Tensor, ...]]:
        """GPU staging buffers for `layer`: two slots, so one layer's copy overlaps its neighbour's compute."""
        slot = layer % 2
        if slot not in self._scratch:
            self._scratch[slot] = self._empty(self.capacity, self.device, False)
        return slot, self._scratch[slot]

    def _copy_behind_compute(self, dst: tuple, src: tuple, n: int) -> torch.cuda.Event:
        """Copy positions [0, n) of every part on the side stream, after the work queued so far on the compute
        stream (which may still be reading the destination or writing the source)."""
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for d, s in zip(dst, src):
                copy_prefix(d, s, n)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def _fetch(self, layer: int, n: int):
        slot, staging = self._staging(layer)
        return slot, self._copy_behind_compute(staging, self._home(layer), n)

    def gather(self, layer: int, spans: list[tuple[int, int]], device: torch.device | None = None):
        """K, V [kv_heads, n, head_dim] of `layer`'s positions in `spans` ([start, end) pairs, in order), on
        `device` (default: the compute device), in the model's dtype. From an offloaded store only these
        positions travel (fp8: quantized), as asynchronous per-head copies from pinned memory (what bi-level
        decoding reads: chosen blocks)."""
        device = self.device if device is None else torch.device(device)
        self.synchronize()
        n = sum(e - s for s, e in spans)
        out = []
        for home in self._home(layer):
            if home.device == device:
                out.append(torch.cat([positions(home, s, e) for s, e in spans], dim=2 if home.ndim == 4 else 0))
                continue
            dst = torch.empty(positions(home, 0, n).shape, dtype=home.dtype, device=device)
            offset = 0
            for s, e in spans:
                for d, src in zip(runs(dst, offset, offset + e - s), runs(home, s, e)):
                    d.copy_(src, non_blocking=True)
                offset += e - s
            out.append(dst)
        k, v = self._read(tuple(out), n)
        return k[0], v[0]

    def decode_buffers(self) -> list[tuple[torch.Tensor, ...]]:
        """Each layer's whole-capacity buffers on the compute device, for a decode step that writes its token's
        K/V at a position held in a device tensor (a captured graph holds these addresses: they stay valid
        until `reserve` grows the store): (K, V) [kv_heads, capacity, head_dim], and in fp8 the K and V scales
        [capacity] after them. Resident stores only."""
        if self.offload:
            raise ValueError("an offloaded store has no resident decode buffers")
        return [tuple(p[0] if p.ndim == 4 else p for p in self._home(i)) for i in range(self.num_layers)]

    # ---- layer-at-a-time access (chunked prefill) ------------------------------------------------------------
    def layer_slot(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writable K, V buffers [1, kv_heads, n, head_dim] on the compute device, in the model's dtype, for
        positions [0, n) of `layer`: the store itself, or (offload, fp8) buffers that `commit` stores."""
        self.reserve(n)
        if self.fp8:
            if self._written is None or self._written[0].shape[2] < n:
                shape = (1, self.num_kv_heads, n, self.head_dim)
                self._written = tuple(torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2))
            return self._written[0][:, :, :n], self._written[1][:, :, :n]
        if not self.offload or self._copy_stream is None:
            k, v = self._home(layer)
            return k[:, :, :n], v[:, :, :n]
        _, (kb, vb) = self._staging(layer)
        # the previous user of this slot (layer-2) must have finished its copy home before we overwrite it
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        return kb[:, :, :n], vb[:, :, :n]

    def commit(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [0, n) of `layer`, written into `layer_slot`'s buffers, are final: store them (with
        offload, the copy home runs behind the next work on the GPU) and return them as stored, which is what
        the layer's attention must read (fp8: quantized and back)."""
        self._len[layer] = n
        offloading = self.offload and self._copy_stream is not None
        if not self.fp8:
            if offloading:
                self._copy_behind_compute(self._home(layer), self._staging(layer)[1], n)
                return tuple(p[:, :, :n] for p in self._scratch[layer % 2][:2])
            k, v = self._home(layer)
            return k[:, :, :n], v[:, :, :n]
        if offloading:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)  # the slot's last copy home
            parts = self._staging(layer)[1]
        else:
            parts = self._home(layer)
        written = self._written[0][:, :, :n], self._written[1][:, :, :n]
        self._write(parts, 0, *written)
        if offloading:
            self._copy_behind_compute(self._home(layer), parts, n)
        # read back as stored, into the written buffers (their values are in `parts` now): no third copy
        return tuple(kv_fp8.dequantize(parts[i][:, :, :n], parts[2 + i][:n], self.dtype, written[i]) for i in (0, 1))

    def synchronize(self) -> None:
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K/V in the model's dtype, where they live (home memory): for inspection and tests."""
        self.synchronize()
        return self._read(self._home(layer), self._len[layer])

    # ---- snapshots (the video KV cache keeps them in memory and writes them to disk) -------------------------
    def _names(self, i: int) -> tuple[str, ...]:
        return (f"k.{i}", f"v.{i}", f"ks.{i}", f"vs.{i}")[:4 if self.fp8 else 2]

    def to_tensors(self, n: int | None = None) -> dict[str, torch.Tensor]:
        """Contiguous CPU copies of every layer's first `n` positions (default: all), as stored: {"k.0", "v.0",
        ...}, and in fp8 the scales {"ks.0", "vs.0", ...}."""
        n = self.length if n is None else n
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot snapshot {n} tokens of a store holding {self.length}")
        self.synchronize()
        out = {}
        for i in range(self.num_layers):
            for name, home in zip(self._names(i), self._home(i)):
                out[name] = positions(home, 0, n).to("cpu", copy=True, memory_format=torch.contiguous_format)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the contents with a `to_tensors` snapshot (same layers, heads, head size and KV dtype; values
        in another float dtype are cast to ours)."""
        n = tensors["k.0"].shape[2]
        for i in range(self.num_layers):
            for name in self._names(i):
                expected = (1, self.num_kv_heads, n, self.head_dim) if name[1] != "s" else (n,)
                if name not in tensors or tuple(tensors[name].shape) != expected:
                    raise ValueError(f"snapshot tensor {name} missing or not of shape {expected}")
                if (tensors[name].dtype == kv_fp8.FP8) != (self.fp8 and name[1] != "s"):
                    raise ValueError(f"snapshot tensor {name} is {tensors[name].dtype}, not this store's KV dtype")
        self.truncate(0)
        self.reserve(n)
        for i in range(self.num_layers):
            for name, home in zip(self._names(i), self._home(i)):
                copy_prefix(home, tensors[name].to(home.dtype), n)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the sources may be freed after we return
        self._len = [n] * self.num_layers


def positions(part: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions [start, end) of a part: a [1, heads, capacity, dim] K or V buffer, or a [capacity] scale buffer."""
    return part[:, :, start:end] if part.ndim == 4 else part[start:end]


def runs(part: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
    """The same positions as contiguous runs: one per head of a K or V buffer (the span across heads is not
    contiguous), the span itself of a scale buffer."""
    return [part[0, h, start:end] for h in range(part.shape[1])] if part.ndim == 4 else [part[start:end]]


def copy_prefix(dst: torch.Tensor, src: torch.Tensor, n: int) -> None:
    """dst's positions [0, n) = src's, between devices, asynchronously, a contiguous run at a time: a
    non-contiguous copy to or from the CPU goes through a pageable staging buffer, synchronously, at a few GB/s."""
    for d, s in zip(runs(dst, 0, n), runs(src, 0, n)):
        d.copy_(s, non_blocking=True)
