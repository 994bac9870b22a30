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
"""
from __future__ import annotations

import torch


class KVStore:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256, offload: bool = False):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.offload = dtype, torch.device(device), offload
        self.home = torch.device("cpu") if offload else self.device
        self._pin = offload and self.device.type == "cuda"
        self._capacity = capacity
        # Offloaded (pinned) buffers are made when a layer is first written: pinning ~20 GB of host memory up
        # front stalls for seconds, while one layer at a time hides behind the GPU's work on the layer before.
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        if not offload:
            for i in range(num_layers):
                self._home(i)
        self._len = [0] * num_layers
        self.plan = None  # chunking.BlockPlan of the prefilled video, when chunk prefill made it
        cuda = offload and self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # GPU staging, two slots
        self._fetched: dict[int, tuple[int, torch.cuda.Event | None]] = {}  # layer -> (slot, copy done)

    def _empty(self, capacity: int) -> torch.Tensor:
        return torch.empty((1, self.num_kv_heads, capacity, self.head_dim), dtype=self.dtype, device=self.home,
                           pin_memory=self._pin)

    def _home(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k[layer] is None:
            self._k[layer], self._v[layer] = self._empty(self._capacity), self._empty(self._capacity)
        return self._k[layer], self._v[layer]

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
        """Bytes of the K and V buffers at full capacity, wherever they live."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self._capacity * self.dtype.itemsize

    def reserve(self, total: int) -> None:
        """Room for `total` tokens in every layer, so a known-length prefill + decode never reallocates."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        for i in range(self.num_layers):
            n = self._len[i]
            for buf in (self._k, self._v):
                if buf[i] is None:
                    continue
                grown = self._empty(new_cap)
                grown[:, :, :n] = buf[i][:, :, :n]
                buf[i] = grown
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
        """Add `k`, `v` ([1, kv_heads, new, head_dim]) to `layer`; return that layer's whole K and V."""
        start = self._len[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            self.reserve(end)
        home_k, home_v = self._home(layer)
        home_k[:, :, start:end] = k
        home_v[:, :, start:end] = v
        self._len[layer] = end
        if not self.offload:
            return self._k[layer][:, :, :end], self._v[layer][:, :, :end]
        return self._read_offloaded(layer, end, k, v)

    def _read_offloaded(self, layer, end, k_new, v_new):
        if self._copy_stream is None:  # offload on a CPU-only machine: home and compute are the same memory
            return self._k[layer][:, :, :end], self._v[layer][:, :, :end]
        start = end - k_new.shape[2]
        slot, done = self._fetched.pop(layer, (None, None))
        if slot is None:  # not prefetched: copy now
            slot, done = self._fetch(layer, start)
        torch.cuda.current_stream(self.device).wait_event(done)
        kb, vb = self._scratch[slot]
        kb[:, :, start:end] = k_new  # the new tokens are already on the GPU
        vb[:, :, start:end] = v_new
        if layer + 1 < self.num_layers:  # overlap the next layer's copy with this layer's attention
            self._fetched[layer + 1] = self._fetch(layer + 1, self._len[layer + 1])
        return kb[:, :, :end], vb[:, :, :end]

    def _staging(self, layer: int) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        """GPU staging buffers for `layer`: two slots, so one layer's copy overlaps its neighbour's compute."""
        slot = layer % 2
        if slot not in self._scratch:
            shape = (1, self.num_kv_heads, self.capacity, self.head_dim)
            self._scratch[slot] = (torch.empty(shape, dtype=self.dtype, device=self.device),
                                   torch.empty(shape, dtype=self.dtype, device=self.device))
        return slot, self._scratch[slot]

    def _copy_behind_compute(self, dst: tuple, src: tuple, n: int) -> torch.cuda.Event:
        """Copy K and V positions [0, n) on the side stream, after the work queued so far on the compute stream
        (which may still be reading the destination or writing the source)."""
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
        `device` (default: the compute device). From an offloaded store only these positions travel, as
        asynchronous per-head copies from pinned memory (what bi-level decoding reads: chosen blocks)."""
        device = self.device if device is None else torch.device(device)
        self.synchronize()
        home_k, home_v = self._home(layer)
        n = sum(e - s for s, e in spans)
        out = []
        for home in (home_k, home_v):
            if home.device == device:
                out.append(torch.cat([home[0, :, s:e] for s, e in spans], dim=1))
                continue
            dst = torch.empty((self.num_kv_heads, n, self.head_dim), dtype=self.dtype, device=device)
            offset = 0
            for s, e in spans:
                for h in range(self.num_kv_heads):  # a head's span is contiguous: a plain async copy
                    dst[h, offset:offset + e - s].copy_(home[0, h, s:e], non_blocking=True)
                offset += e - s
            out.append(dst)
        return out[0], out[1]

    def decode_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's whole-capacity K, V buffers [kv_heads, capacity, head_dim] on the compute device, for a
        decode step that writes its token's K/V at a position held in a device tensor (a captured graph holds
        these addresses: they stay valid until `reserve` grows the store). Resident stores only."""
        if self.offload:
            raise ValueError("an offloaded store has no resident decode buffers")
        return [(self._home(i)[0][0], self._home(i)[1][0]) for i in range(self.num_layers)]

    # ---- layer-at-a-time access (chunked prefill) ------------------------------------------------------------
    def layer_slot(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writable K, V buffers [1, kv_heads, n, head_dim] on the compute device for positions [0, n) of
        `layer`. Without offload they are the store itself; with offload, GPU staging sent home by `commit`."""
        self.reserve(n)
        if not self.offload or self._copy_stream is None:
            home_k, home_v = self._home(layer)
            return home_k[:, :, :n], home_v[:, :, :n]
        _, (kb, vb) = self._staging(layer)
        # the previous user of this slot (layer-2) must have finished its copy home before we overwrite it
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        return kb[:, :, :n], vb[:, :, :n]

    def commit(self, layer: int, n: int) -> None:
        """Positions [0, n) of `layer` are final. With offload, copy them home behind the next layer's work."""
        self._len[layer] = n
        if not self.offload or self._copy_stream is None:
            return
        self._copy_behind_compute(self._home(layer), self._staging(layer)[1], n)

    def synchronize(self) -> None:
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K/V where they live (home memory): for inspection and tests."""
        self.synchronize()
        n = self._len[layer]
        home_k, home_v = self._home(layer)
        return home_k[:, :, :n], home_v[:, :, :n]

    # ---- snapshots (the video KV cache keeps them in memory and writes them to disk) -------------------------
    def to_tensors(self, n: int | None = None) -> dict[str, torch.Tensor]:
        """Contiguous CPU copies of every layer's first `n` positions (default: all): {"k.0", "v.0", ...}."""
        n = self.length if n is None else n
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot snapshot {n} tokens of a store holding {self.length}")
        self.synchronize()
        out = {}
        for i in range(self.num_layers):
            home_k, home_v = self._home(i)
            for name, home in ((f"k.{i}", home_k), (f"v.{i}", home_v)):
                out[name] = home[:, :, :n].to("cpu", copy=True, memory_format=torch.contiguous_format)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the contents with a `to_tensors` snapshot (same layers, heads, head size; cast to our dtype)."""
        n = tensors["k.0"].shape[2]
        expected = (1, self.num_kv_heads, n, self.head_dim)
        for i in range(self.num_layers):
            for name in (f"k.{i}", f"v.{i}"):
                if name not in tensors or tuple(tensors[name].shape) != expected:
                    raise ValueError(f"snapshot tensor {name} missing or not of shape {expected}")
        self.truncate(0)
        self.reserve(n)
        for i in range(self.num_layers):
            home_k, home_v = self._home(i)
            copy_prefix(home_k, tensors[f"k.{i}"].to(self.dtype), n)
            copy_prefix(home_v, tensors[f"v.{i}"].to(self.dtype), n)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the sources may be freed after we return
        self._len = [n] * self.num_layers


def copy_prefix(dst: torch.Tensor, src: torch.Tensor, n: int) -> None:
    """dst[:, :, :n] = src[:, :, :n] between devices, asynchronously. Per head, because the prefix of a
    [1, heads, capacity, dim] buffer is not contiguous, and a non-contiguous copy to or from the CPU goes
    through a pageable staging buffer, synchronously, at a few GB/s."""
    for h in range(dst.shape[1]):
        dst[0, h, :n].copy_(src[0, h, :n], non_blocking=True)
