"""videoxl: ask questions about hour-long videos with Video-XL-2 on one GPU.

    model, tokenizer = videoxl.load("/path/to/Video-XL-2")
    print(model.chat("video.mp4", tokenizer, "What happens?", max_num_frames=150, sample_fps=1))
"""
from videoxl.demo import demo_model_path
from videoxl.errors import VideoXLError, VideoXLMemoryError, VideoXLWarning
from videoxl.checkpoint.loader import load
from videoxl.live.session import LiveSession

__all__ = ["load", "LiveSession", "VideoXLError", "VideoXLMemoryError", "VideoXLWarning", "demo_model_path"]
__version__ = "0.1.0"
