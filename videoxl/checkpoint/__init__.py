"""Checkpoint folder <-> parameters: the released format read (loader.py) and written (tiny.py, for tests)."""
