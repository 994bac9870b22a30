"""Stage 3, embeddings -> KV store: dense, 'mask' (block-sparse) and 'streaming' prefill (modes.py) over the
block pattern that `prefill_config` asks for (plan.py)."""
