"""The one exception type for user errors: the CLI prints its message on one line and exits 1."""


class LrsError(Exception):
    """A problem with the user's input (paths, shapes, options), not a bug in lrs."""
