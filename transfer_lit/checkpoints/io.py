"""Checkpoint files that are either the old version or the new one, never half of one.

Lightning's ``TorchCheckpointIO`` serialises into memory, writes a temporary file in the system
temp folder and moves it over the target. When that folder is on another filesystem (``/tmp`` on
tmpfs is common) the move degrades to a copy straight into the target, so a process killed during
the copy leaves a truncated ``last.ckpt``; nothing is fsync'ed either. :class:`AtomicCheckpointIO`
writes next to the target, fsyncs, and renames with ``os.replace`` (atomic on POSIX and Windows
within one filesystem), then fsyncs the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

TEMP_SUFFIX = ".tmp"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    temp = temp_path(path)
    try:
        with temp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
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
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if type(get_filesystem(path)).__name__ != "LocalFileSystem":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
