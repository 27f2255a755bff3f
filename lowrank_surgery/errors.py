"""The one exception type for user errors: the CLI prints its message on one line and exits 1."""


import warnings


class LrsError(Exception):
    """A problem with the user's input (paths, shapes, options), not a bug in lrs."""


class LrsWarning(UserWarning):
    """Something lrs could not know and assumed: the CLI prints it as one `warning:` line and goes on."""


def warn(message: str) -> None:
    """Issue an LrsWarning (library users see Python's warning; the CLI one line on stderr)."""
    warnings.warn(message, LrsWarning, stacklevel=3)
