"""A video's prefix KVs across questions and restarts: a keyed store that never sees a model (store.py), its
disk side (disk.py) and the digests of its keys (identity.py)."""
