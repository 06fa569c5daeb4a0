"""The one exception type for mistakes a user can make (bad config, missing file, bad flag).

The CLI prints its message without a traceback and exits 2; library callers catch it like any
ValueError.
"""


class CrossLayerError(ValueError):
    """A user-facing error: the message names the field or file and what is allowed."""


class TrainingDiverged(CrossLayerError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""
