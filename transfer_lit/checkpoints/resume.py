"""A resumed ``fit`` continues its own run folder: the version folder of its checkpoint, one learning curve.

Lightning gives every run a new logger version (``version_N+1``) and ``ModelCheckpoint`` a new folder in it, so a
resumed run's ``metrics.csv`` starts empty, and ``ModelCheckpoint`` forgets its best checkpoints (it restores them
only when its folder is the checkpoint's). :func:`continue_run` points the loggers back at the checkpoint's
version folder when ``--ckpt_path`` lies in ``<save_dir>/<name>/<version>/checkpoints/`` of this run's logger:

* ``CSVLogger``: Lightning's writer deletes an existing ``metrics.csv``; its rows from before the checkpoint are
  written back first and the resumed run appends to them. Rows of the steps the resumed run logs again (those of a
  run that went on after the checkpoint, or was stopped later) are dropped.
* ``TensorBoardLogger``: a new event file in the same folder, written with ``purge_step`` so that TensorBoard hides
  the older events of the steps logged again.

A logger given an explicit ``version`` keeps it (``--trainer.logger.init_args.version 7``: a new folder).
"""

from __future__ import annotations

import csv
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from transfer_lit.checkpoints.io import load_torch_file

_VERSION = re.compile(r"version_(\d+)")


def resumed_step(checkpoint: Mapping[str, Any]) -> int:
    """The logger step at which a fit resumed from ``checkpoint`` logs its first metrics.

    Lightning logs at ``_batches_that_stepped`` (its fit loop's state). It adds one on restart, except when the
    checkpoint was written after the last batch's end (end of an epoch, or a stop at a batch boundary), when the
    saved value has been counted already.
    """
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    saved = (loop.get("epoch_loop.state_dict") or {}).get("_batches_that_stepped", checkpoint.get("global_step", 0))
    total = (loop.get("epoch_loop.batch_progress") or {}).get("total") or {}
    after_last_batch = len({total.get(k) for k in ("ready", "started", "processed", "completed")}) == 1
    return int(saved) if after_last_batch else int(saved) + 1


def _version(folder: Path) -> int | str:
    """The logger ``version`` of a version folder: ``version_3`` is 3, another name is itself."""
    match = _VERSION.fullmatch(folder.name)
    return int(match.group(1)) if match else folder.name


def _step(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "-inf")
    except ValueError:
        return float("-inf")


def _continue_csv(logger: CSVLogger, step: int) -> int:
    """Keep the rows of ``logger``'s ``metrics.csv`` logged before ``step`` as the start of the file the resumed run
    appends to; returns how many rows were dropped."""
    path = Path(logger.log_dir) / "metrics.csv"
    header: list[str] = []
    rows: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
    with warnings.catch_warnings():  # "... Previous log files in this directory will be deleted": not those kept
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment  # Lightning's writer removes the existing metrics.csv here
    kept = [row for row in rows if _step(row) < step]
    if kept:
        with path.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(kept)
        writer.metrics_keys = list(header)  # its next save appends (or rewrites the header for new columns)
    return len(rows) - len(kept)


def continue_run(trainer: Trainer, ckpt_path: str | None) -> tuple[Path, int] | None:
    """Make a ``fit`` resumed from ``ckpt_path`` log and checkpoint into that checkpoint's version folder.

    Call it before ``trainer.fit`` (the loggers must not have chosen their version yet). Loggers whose
    ``root_dir`` is the folder above the checkpoint's version folder and that were given no ``version`` continue
    it; the others are left alone.

    Args:
        trainer: the trainer about to fit.
        ckpt_path: the checkpoint it resumes from (``last`` resolved already); ``None`` or another file: nothing done.

    Returns:
        ``(version folder, metrics.csv rows dropped)`` (also printed to stderr), or ``None`` when the run goes to a
        new folder as usual.
    """
    if not ckpt_path or not trainer.loggers or not Path(ckpt_path).is_file():
        return None
    checkpoints = Path(ckpt_path).resolve().parent
    folder = checkpoints.parent
    loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger | TensorBoardLogger)
               and logger._version is None and Path(logger.root_dir).resolve() == folder.parent]
    # ModelCheckpoint writes in the first logger's folder: continue only when that is the checkpoint's.
    if checkpoints.name != "checkpoints" or not loggers or loggers[0] is not trainer.loggers[0]:
        return None
    step = resumed_step(load_torch_file(ckpt_path, "--ckpt_path", mmap=True))
    dropped = 0
    for logger in loggers:
        logger._version = _version(folder)  # what Lightning's own `version=` argument sets
        if isinstance(logger, TensorBoardLogger):
            if logger._kwargs.get("purge_step") is None:  # SummaryWriter hides the older events from this step on
                logger._kwargs["purge_step"] = step
        elif trainer.is_global_zero:
            dropped += _continue_csv(logger, step)
    # ModelCheckpoint's "Checkpoint directory ... exists and is not empty" is what resuming in the same folder means.
    warnings.filterwarnings("ignore", message=rf"(?s)Checkpoint directory .*{re.escape(folder.name)}.checkpoints "
                                              r"exists and is not empty")
    if trainer.is_global_zero:
        print(f"transfer-lit: resuming in {folder} from step {step} ({dropped} later rows of metrics.csv dropped)",
              file=sys.stderr)
    return folder, dropped
