"""Stage 1, video -> frames: a file, images or arrays become sampled, timestamped 384x384 frames.

sources.py (what the caller gave; the reference's sampling rules), read.py (which decoder, modes),
index.py (packets, keyframe-aligned jobs), decode.py (CPU decoder threads), gpu.py (NVDEC frames on the GPU),
stream.py (frames handed on while they decode).
"""
