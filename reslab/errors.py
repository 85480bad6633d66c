"""The exception types users see: each message is a complete sentence naming the problem and the fix."""


class ReslabError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""


class NonFiniteLoss(ReslabError):
    """The loss or the weights became NaN or infinite; no checkpoint is written over a good one."""


class TrainingInterrupted(ReslabError):
    """Raised after an interrupted run has saved its checkpoint; the CLI exits with 130. Under
    torchrun every process raises it; ``is_main`` marks the one that reports."""

    def __init__(self, message: str, *, is_main: bool = True) -> None:
        super().__init__(message)
        self.is_main = is_main
