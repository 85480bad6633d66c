"""The one exception type users see: its message is a complete sentence naming the problem and the fix."""


class ReslabError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""
