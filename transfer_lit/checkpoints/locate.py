"""Where a run's checkpoints are, ``--ckpt_path last`` across logger versions, and the command that resumes."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer_lit.checkpoints.io import load_torch_file, remove_stale_temps


def checkpoint_dir(trainer: Trainer) -> Path:
    """The folder of this run's ``ModelCheckpoint`` (set in its ``setup``), else ``<default_root_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def checkpoint_folders(trainer: Trainer) -> list[Path]:
    """Where ``ModelCheckpoint`` writes for this configuration, this run's and earlier runs' folders: its ``dirpath``
    if set, else every version folder of the first logger (``<save_dir>/<name>/*/checkpoints``), else
    ``<default_root_dir>/checkpoints``."""
    folders: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append(Path(callback.dirpath))
    if not folders and trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = Path(logger.save_dir or trainer.default_root_dir)
        folders += sorted(save_dir.joinpath(str(logger.name)).glob("*/checkpoints"))
    if not folders:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return folders


def training_progress(path: Path) -> tuple[int, int]:
    """``(global_step, epoch)`` at which a Lightning checkpoint was saved, its tensors memory-mapped rather than read
    (``torch.load(mmap=True)``); ``(-1, -1)`` for a file that is no readable checkpoint."""
    try:
        loaded = load_torch_file(path, "--ckpt_path last", mmap=True)
    except ValueError:
        return -1, -1
    if not isinstance(loaded, dict):
        return -1, -1
    return int(loaded.get("global_step", -1)), int(loaded.get("epoch", -1))


def find_last_checkpoint(trainer: Trainer, interrupt_name: str = "interrupted.ckpt") -> Path | None:
    """The checkpoint to go on from: of the ``last*.ckpt`` and interrupt checkpoints in :func:`checkpoint_folders`,
    those of the latest run (the folder of the newest file: a new fit is a new version folder), and of them the one
    with the most training progress (:func:`training_progress`), the newer on a tie. A stale ``interrupted.ckpt``
    (touched or copied since) never beats a ``last.ckpt`` that trained further, nor the reverse. Temporary files
    of an interrupted write are never candidates."""
    candidates = [p for folder in checkpoint_folders(trainer)
                  for p in (*folder.glob("last*.ckpt"), folder / interrupt_name) if p.is_file()]
    if not candidates:
        return None
    run = max(candidates, key=lambda p: p.stat().st_mtime).parent
    return max((p for p in candidates if p.parent == run), key=lambda p: (*training_progress(p), p.stat().st_mtime))


def resolve_last_checkpoint(trainer: Trainer, config: Any, command: str | None) -> None:
    """Before ``command`` runs: remove the partial writes of killed processes from this configuration's checkpoint
    folders, and put the checkpoint :func:`find_last_checkpoint` finds in place of ``config["ckpt_path"] == "last"``
    (Lightning looks for ``last`` only in this run's new, empty, logger version folder).

    Raises:
        FileNotFoundError: ``last`` for ``validate`` / ``test`` / ``predict`` with no checkpoint to find (Lightning
            would go on with the untrained weights).
    """
    if trainer.is_global_zero:  # 18 MB+ each
        for folder in checkpoint_folders(trainer):
            for temp in remove_stale_temps(folder):
                print(f"transfer-lit: removed {temp}, the partial write of a killed process", file=sys.stderr)
    if config.get("ckpt_path") != "last":
        return
    found = find_last_checkpoint(trainer)
    if found is None and command != "fit":
        raise FileNotFoundError(f"--ckpt_path last: no checkpoint to {command} in this run's folders "
                                f"(trainer.default_root_dir={trainer.default_root_dir!r}); fit first, or give "
                                f"the checkpoint's path")
    if found is not None:
        print(f"transfer-lit: --ckpt_path last = {found}", file=sys.stderr)
        config["ckpt_path"] = str(found)


def resume_command(argv: list[str], checkpoint: str) -> str:
    """``argv`` as a ``transfer-lit`` command line with ``--ckpt_path`` set to ``checkpoint``."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        kept.append(arg)
    return shlex.join(["transfer-lit", *kept, "--ckpt_path", checkpoint])
