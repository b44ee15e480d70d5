"""Checkpoint files that are either the old version or the new one, never half of one.

Lightning's ``TorchCheckpointIO`` serialises into memory, writes a temporary file in the system
temp folder and moves it over the target. When that folder is on another filesystem (``/tmp`` on
tmpfs is common) the move degrades to a copy straight into the target, so a process killed during
the copy leaves a truncated ``last.ckpt``; nothing is fsync'ed either. :class:`AtomicCheckpointIO`
writes next to the target, fsyncs, and renames with ``os.replace`` (atomic on POSIX and Windows
within one filesystem), then fsyncs the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from transfer_lit.errors import storage_error

TEMP_SUFFIX = ".tmp"
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def load_torch_file(path: _PATH, key: str, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``, with one clear ``ValueError`` naming ``key`` and the file when it
    is truncated, not a torch file, or holds pickled Python objects (refused: weights-only loading runs none)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{key}={str(path)!r} was refused: it holds pickled Python objects other than tensors and "
                         f"plain containers, and is loaded with weights_only=True, so nothing in it was executed; "
                         f"save a state dict (torch.save(model.state_dict(), ...)) or a Lightning checkpoint "
                         f"({str(error).splitlines()[-1][:160]})") from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise ValueError(f"{key}={str(path)!r} is not a readable torch file ({size:,} bytes): truncated (a copy or "
                         f"download cut short) or another format ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120]})") from None


def temp_path(path: Path) -> Path:
    """Where :class:`AtomicCheckpointIO` writes ``path`` before renaming it: hidden, same folder, per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` of writes whose process was killed; return them."""
    removed = []
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):
        pid = temp.name[: -len(TEMP_SUFFIX)].rpartition(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to a temporary file in the target's folder, fsync, then ``os.replace`` it over ``path``."""
    path = Path(path)
    temp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        with temp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)  # the previous file, if any, is untouched
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            raise storage_error(path, error) from error
        if isinstance(error, RuntimeError) and "write failed" in str(error):  # torch's zip writer on a full disk
            raise storage_error(path, OSError(errno.EIO, "the write failed (is the disk full?)")) from error
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: a kill at any moment leaves the previous file intact.

    Every checkpoint Lightning writes (``ModelCheckpoint`` top-k and ``last``, ``trainer.save_checkpoint``,
    the interrupt checkpoint of :class:`~transfer_lit.callbacks.FaultTolerance`) goes through the strategy's
    ``checkpoint_io``, so passing this as a Trainer plugin covers them all. Remote paths (``s3://`` ...) keep
    Lightning's behaviour: object stores replace whole objects anyway.
    """

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """As Lightning's, but a truncated, foreign or object-holding local checkpoint gets one clear error."""
        if type(get_filesystem(path)).__name__ != "LocalFileSystem" or weights_only is False:
            return super().load_checkpoint(path, map_location, weights_only)
        if not Path(path).is_file():
            raise FileNotFoundError(f"--ckpt_path={str(path)!r}: no such checkpoint file")
        return load_torch_file(path, "--ckpt_path", map_location if map_location is not None else "cpu")

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if type(get_filesystem(path)).__name__ != "LocalFileSystem":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
