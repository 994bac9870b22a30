"""The prefill stage's entry: the prompt's embeddings up to the end of the video -> a filled KV store, in the
mode that `prefill_config` asks for (modes.py), with the block pattern kept on the store for bi-level decoding."""
from __future__ import annotations

import torch

from videoxl.language.decoder import Qwen2Decoder
from videoxl.language.kv_store import KVStore
from videoxl.language.prompt import VideoPrompt
from videoxl.prefill.modes import dense_prefill, mask_prefill, streaming_prefill
from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.progress import close, progress

LONG_PREFILL_TOKENS = 20000  # show a prefill progress bar above this


def prefill(decoder: Qwen2Decoder, embeds: torch.Tensor, store: KVStore, prompt: VideoPrompt,
            chunking: PrefillConfig | None = None, show_progress=False) -> dict:
    """Fill `store` with the KVs of `embeds` (the prompt up to the end of the video); returns stats."""
    long = embeds.shape[1] > LONG_PREFILL_TOKENS
    bar = progress(None, len(decoder.layers), "prefill", show_progress if long else False)
    on_layer = (lambda i: bar.update_to(i + 1)) if bar else None
    try:
        if chunking is None:
            dense_prefill(decoder, embeds, store, on_layer)
            return {"prefill": "dense", "attended_share": 1.0}
        plan = BlockPlan.from_prompt(prompt, chunking)
        store.plan = plan
        if chunking.chunk_prefill_mode == "mask":
            mask_prefill(decoder, embeds, store, plan)
        else:
            streaming_prefill(decoder, embeds, store, plan, on_layer)
    finally:
        close(bar)
    return {"prefill": chunking.chunk_prefill_mode, "blocks": len(plan.blocks),
            "attended_share": round(plan.attended_share(), 4), "offload": chunking.offload}
