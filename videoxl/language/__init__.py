"""The Qwen2 decoder (decoder.py), the KV store it writes (kv_store.py) and the ChatML prompt around a video
with its `Time {t}s:` tokens (prompt.py)."""
