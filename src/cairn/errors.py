"""User-facing errors.

Anything the user can fix (a missing file, a bad config key, an unknown model) is raised as a
``CairnError`` whose message says what is wrong, where, and how to fix it. The CLI prints the
message and exits with status 2, never a traceback; everything else is a bug and keeps its traceback.
"""


class CairnError(Exception):
    """An error caused by user input; its message is shown as-is by the CLI."""


class TrainingDiverged(CairnError):
    """The training loss (or one of its terms) became NaN/Inf; raised before anything is saved."""
