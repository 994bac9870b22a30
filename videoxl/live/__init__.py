"""Live video: questions about a video while it is still being recorded (session.py, frames.py, source.py)."""
