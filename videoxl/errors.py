"""The one exception type users see. Every check at an entry point raises it with a one-line message."""


class VideoXLError(Exception):
    """A problem with the user's input (video, checkpoint, settings): the message says what and where."""
