"""Exception type for user-facing errors (bad paths, bad data, mismatched checkpoints, unknown models).

The CLI prints a ``LinvisionError`` as one line ``linvision: error: <message>`` and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class LinvisionError(Exception):
    """A user-facing error whose message names the offending path, model or key."""


_WORKER_PREFIX = "Caught LinvisionError in DataLoader worker"
_ORIGINAL = "LinvisionError: "


def user_message(e: BaseException) -> str:
    """The one-line message of a user-facing error. A :class:`LinvisionError` raised inside a ``DataLoader``
    worker reaches the main process re-raised by torch with ``"Caught LinvisionError in DataLoader worker
    process N. Original Traceback ..."``; this returns the original message (the traceback's last
    ``...LinvisionError: <message>`` line) instead. Lines of a multi-line message are joined with ``"; "``."""
    text = str(e)
    if text.startswith(_WORKER_PREFIX):
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            head, sep, rest = lines[i].partition(_ORIGINAL)
            if sep and (head == "" or head.endswith(".")) and " " not in head:
                text = "\n".join([rest] + lines[i + 1:])
                break
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
