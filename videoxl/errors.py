"""The one exception type users see. Every check at an entry point raises it with a one-line message."""


class VideoXLError(Exception):
    """A problem with the user's input (video, checkpoint, settings): the message says what and where."""


class VideoXLMemoryError(VideoXLError):
    """Out of (GPU or CPU) memory, or a memory estimate that says it would be: the message names what to lower."""


class VideoXLWarning(UserWarning):
    """Something the user should know about an answer that still went ahead (e.g. a video that ended early)."""
