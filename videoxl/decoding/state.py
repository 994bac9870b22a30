"""What decoding keeps for one prefilled video between its questions, owned by that video's cache entry.

A follow-up question should pay only for its own tokens: the captured decode step (a CUDA graph bound to the
store it decodes on) is reused, and bi-level decoding's pooled level and mixed store are made once per video.
All of it lives here, on an object the video cache entry holds, so it goes when the video goes and its bytes are
counted with the video's (`nbytes`).
"""
from __future__ import annotations

from videoxl.language.kv_store import KVStore


class DecodeState:
    def __init__(self):
        self._steps: dict[int, object] = {}  # id(store) -> its CapturedStep (which holds the store weakly)
        self.level = None  # bi-level: the pooled KVs (SparseLevel) at `level.compression`, one at a time
        self.mixed: KVStore | None = None  # bi-level: the dense/pooled store questions run over

    def captured_step(self, store: KVStore):
        step = self._steps.get(id(store))
        return step if step is not None and step.cache_ref() is store else None

    def keep_step(self, store: KVStore, step) -> None:
        # drop steps whose store is gone (a replaced mixed store): an id can be reused by a new store
        self._steps = {k: s for k, s in self._steps.items() if s.cache_ref() is not None}
        self._steps[id(store)] = step

    def drop_mixed(self) -> KVStore | None:
        """The mixed store, taken out: a question reuses it (its captured step still valid) or frees it before
        making a larger one (its step then goes at the next `keep_step`)."""
        mixed, self.mixed = self.mixed, None
        return mixed

    def video_grew(self) -> None:
        """The video's store grew (a live session appended frames): the mixed store was made for the shorter
        video; the pooled level is extended by the next question (bilevel.sparse_level). (A captured step checks
        by itself that it still fits its store.) The mixed store's captured step goes with it: the step holds
        the store's buffers (and its graph's memory), so keeping it kept a question's dense blocks on the GPU
        until the next question; with offload, a live session's GPU memory then grew with every question
        (bench/live.py on the H200: 15.3 -> 19.7 GiB over an hour with questions at 10 and 30 minutes)."""
        self.mixed = None
        self._steps = {k: s for k, s in self._steps.items() if s.cache_ref() is not None}

    @property
    def nbytes(self) -> int:
        level = 0 if self.level is None else sum(t.nbytes for t in self.level.k + self.level.v)
        return level + (0 if self.mixed is None else self.mixed.nbytes)
