"""`sparse_config`: the settings of bi-level KV decoding (`model.config.enable_sparse`), validated once."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from videoxl.config import settings_from_dict
from videoxl.errors import VideoXLError


@dataclass
class SparseConfig:
    # Share of the video's blocks kept dense (a float in (0, 1]) or a number of blocks (a whole number >= 1).
    # The first and last blocks and the blocks of `dense_times` are always dense and count towards it.
    budget: float | int = 0.25
    compression: int = 4  # visual KVs of a sparse block are averaged over windows of this many tokens
    dense_times: list | None = None  # [[start, end], ...] seconds that must stay dense
    # How the rest of the budget is chosen: "model" (the question's attention, the model card's way) or "random"
    # (blocks drawn with `seed`: the baseline that tells whether in-model choice finds anything)
    select: str = "model"
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict | None) -> "SparseConfig":
        return settings_from_dict(cls, d, "sparse_config")

    def validate(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise VideoXLError(f"sparse_config: budget must be a share in (0, 1] or a whole number of blocks, "
                               f"got {b!r}")
        if isinstance(b, numbers.Integral):
            if b < 1:
                raise VideoXLError(f"sparse_config: budget as a number of blocks must be >= 1, got {b}")
            self.budget = int(b)
        elif not 0 < b <= 1:
            raise VideoXLError(f"sparse_config: budget as a share must be in (0, 1], got {b}")
        c = self.compression
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
            raise VideoXLError(f"sparse_config: compression must be an integer >= 1, got {c!r}")
        self.compression = int(c)
        spans = self.dense_times or []
        if not isinstance(spans, (list, tuple)):
            raise VideoXLError(f"sparse_config: dense_times must be a list of [start, end] seconds, got {spans!r}")
        for span in spans:
            ok = (isinstance(span, (list, tuple)) and len(span) == 2 and all(
                isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) for t in span)
                and 0 <= span[0] <= span[1])
            if not ok:
                raise VideoXLError(f"sparse_config: each dense_times entry must be [start, end] seconds with "
                                   f"0 <= start <= end, got {span!r}")
        self.dense_times = [[float(s), float(e)] for s, e in spans]
        if self.select not in ("model", "random"):
            raise VideoXLError(f"sparse_config: select must be 'model' or 'random', got {self.select!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise VideoXLError(f"sparse_config: seed must be an integer, got {self.seed!r}")

    def dense_count(self, blocks: int) -> int:
        if isinstance(self.budget, int):
            return min(self.budget, blocks)
        return min(blocks, math.ceil(self.budget * blocks - 1e-9))
