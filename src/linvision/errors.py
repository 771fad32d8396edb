"""Exception type for user-facing errors (bad paths, bad data, mismatched checkpoints, unknown models).

The CLI prints a ``LinvisionError`` as one line ``linvision: error: <message>`` and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class LinvisionError(Exception):
    """A user-facing error whose message names the offending path, model or key."""
