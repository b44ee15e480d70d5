"""What counts as a user error: the CLI shows its message in one line (no traceback) and exits with 2.

An error of these types is about the user's input when transfer_lit or Lightning raised it (its innermost
frame is in one of the two packages: what they raise of these types is about arguments, paths and
configuration), in the main process or in a DataLoader worker
(which re-raises it as ``Caught <Name> in DataLoader worker process <i>``). The same types raised elsewhere
(a bug in the user's own backbone or module, in torch) keep their traceback, as does everything else.
``--debug`` shows the traceback of a user error too.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import lightning
from lightning.fabric.utilities.exceptions import MisconfigurationException


class StorageError(OSError):
    """A file could not be written where the run was told to write it (disk full, read-only, no permission)."""


#: errno of a write refused by the storage itself: no space, quota exceeded, read-only file system.
_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def storage_error(path: object, error: OSError) -> StorageError:
    """:class:`StorageError` naming ``path``, what the system said, and the free space of its filesystem."""
    folder = Path(str(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        space = shutil.disk_usage(folder).free
        shown = f"{space / 2**30:.2f} GiB" if space >= 2**30 else f"{space / 2**20:.1f} MiB"
        free = f"; {shown} free on {folder}'s filesystem"
    except OSError:
        free = ""
    return StorageError(error.errno, f"cannot write {str(path)!r}: {error.strerror or error}{free}; choose another "
                                     f"folder (trainer.default_root_dir) or free some space")


#: Errors caused by the user's input: the CLI prints the message (no traceback) and exits with 2.
USER_ERRORS: tuple[type[BaseException], ...] = (StorageError,
    ValueError, KeyError, FileNotFoundError, NotADirectoryError, TypeError, FloatingPointError,
    MisconfigurationException,
)
#: A DataLoader worker's exception reaches the main process as "Caught <Name> in DataLoader worker process <i>.
#: Original Traceback ...", re-raised as <Name>(that text) or, when <Name> needs other arguments, RuntimeError.
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")
_WORKER_USER_ERRORS = {"BadImageError"} | {e.__name__ for e in USER_ERRORS}
#: torch's error when a BatchNorm layer in training mode sees one value per channel (a batch of one after pooling).
_ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"
_PACKAGES = (Path(__file__).resolve().parent, Path(lightning.__file__).resolve().parent)
_WORKER_FRAME = re.compile(r'File "([^"]+)", line \d+')


def _ours(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(package) for package in _PACKAGES)


def raised_by_transfer_lit(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in transfer_lit or Lightning (not in user code)."""
    traceback, last = error.__traceback__, None
    while traceback is not None:
        last, traceback = traceback, traceback.tb_next
    return last is not None and _ours(last.tb_frame.f_code.co_filename)


def unwrapped(error: BaseException) -> BaseException:
    """What a class raised when jsonargparse built it in subclass mode (``--data``), which it re-raises wrapped in a
    ``ValueError("Does not validate against any of the Union subtypes ...")``; any other error as it is."""
    while isinstance(error, ValueError) and str(error).startswith("Does not validate against any of the Union") \
            and error.__cause__ is not None:
        error = error.__cause__
    return error


def user_error_message(error: BaseException) -> str | None:
    """The one-line message to show for a user error (also one raised in a DataLoader worker), else ``None``."""
    worker = _WORKER_ERROR.match(str(error))
    if worker is not None:
        name = worker.group(1)
        original = re.search(rf"\n(?:[\w.]+\.)?{name}: (.*?)\s*\Z", str(error), re.DOTALL)
        frames = _WORKER_FRAME.findall(str(error))
        ours = bool(frames) and _ours(frames[-1])
        return original.group(1) if name in _WORKER_USER_ERRORS and original and ours else None
    if isinstance(error, StorageError):
        return error.strerror or str(error)
    if isinstance(error, OSError) and error.errno in _FULL_OR_READ_ONLY and error.filename is not None:
        # Wherever a write met a full disk or a read-only file system (a logger's folder, a report): not a bug.
        return storage_error(error.filename, error).strerror
    if isinstance(error, ValueError) and str(error).startswith(_ONE_VALUE_PER_CHANNEL):
        return (f"a BatchNorm layer that trains on batch statistics got a training batch of one sample (torch: "
                f"{error}); valid: data.batch_size >= 2, or the backbone's BatchNorm in eval mode (model.bn_policy: "
                f"frozen, or model.mode: linear_probe); a head with BatchNorm needs batches of 2 or more in any mode. "
                f"A batch also shrinks by the unreadable images data.bad_images: skip leaves out of it: remove them "
                f"(data.scan: true lists them all before training)")
    if isinstance(error, MisconfigurationException) or (isinstance(error, USER_ERRORS)
                                                         and raised_by_transfer_lit(error)):
        return str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    return None
