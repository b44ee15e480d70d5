"""What counts as a user error: the CLI shows its message in one line (no traceback) and exits with 2.

Errors of these types, raised in the main process or in a DataLoader worker (which re-raises them as
``Caught <Name> in DataLoader worker process <i>``), are reported as the user's input being wrong.
Everything else keeps its traceback. ``--debug`` shows the traceback of a user error too.
"""

from __future__ import annotations

import re

from lightning.fabric.utilities.exceptions import MisconfigurationException

#: Errors caused by the user's input: the CLI prints the message (no traceback) and exits with 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, NotADirectoryError, TypeError, FloatingPointError,
    MisconfigurationException,
)
#: A DataLoader worker's exception reaches the main process as "Caught <Name> in DataLoader worker process <i>.
#: Original Traceback ...", re-raised as <Name>(that text) or, when <Name> needs other arguments, RuntimeError.
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")
_WORKER_USER_ERRORS = {"BadImageError"} | {e.__name__ for e in USER_ERRORS}


def user_error_message(error: BaseException) -> str | None:
    """The one-line message to show for a user error (also one raised in a DataLoader worker), else ``None``."""
    worker = _WORKER_ERROR.match(str(error))
    if worker is not None:
        name = worker.group(1)
        original = re.search(rf"\n(?:[\w.]+\.)?{name}: (.*?)\s*\Z", str(error), re.DOTALL)
        return original.group(1) if name in _WORKER_USER_ERRORS and original else None
    if isinstance(error, USER_ERRORS):
        return str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    return None
