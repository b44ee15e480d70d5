"""What ``transfer-lit`` prints: Lightning's notices that only alarm are silenced, nothing that informs.

Silenced, each matched by its own text (a real warning with other words still shows):

* the tensorboardX notice (the CSV logger it announces is what every run uses unless tensorboard is installed);
* the litlogger advertisement;
* the ``_pytree`` ``LeafSpec`` deprecation raised inside Lightning itself;
* "Found N module(s) in eval mode": transfer_lit keeps frozen BatchNorm (and a linear probe's whole backbone) in
  eval mode on purpose (``model.bn_policy``);
* for ``validate`` / ``test`` / ``predict`` only: "the dirpath has changed" (the run folder of a reloaded
  checkpoint) and "callbacks used to create the checkpoint need to be provided" (``ProgressiveUnfreezing`` only
  matters to ``fit``; a resumed ``fit`` still warns).

:func:`progress_bar` picks Lightning's ``RichProgressBar`` in a terminal when ``rich`` is installed
(``pip install 'transfer-lit[rich]'``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from lightning.pytorch import Callback

_ALWAYS = (
    r"(?s).*`tensorboardX` has been removed as a dependency",
    r"(?s).*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"(?s).*module\(s\) in eval mode at the start of training",
)
_EVALUATION = (
    r"(?s).*The dirpath has changed from",
    r"(?s).*callbacks used to create the checkpoint need to be provided",
)
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def quiet_lightning(subcommand: str | None) -> Iterator[None]:
    """Within this context, silence the notices listed in the module doc (``subcommand``: ``fit``, ``test``, ...)."""
    drop = _DropAdvertisements()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    with warnings.catch_warnings():
        for pattern in _ALWAYS + (_EVALUATION if subcommand in ("validate", "test", "predict") else ()):
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def progress_bar(trainer: Any) -> Callback | None:
    """Lightning's ``RichProgressBar`` when ``rich`` is installed, stdout is a terminal (a log file keeps Lightning's
    plain bar), and the ``trainer`` config (``enable_progress_bar``, ``callbacks``) neither hides the bar nor names a
    progress bar of its own; else ``None`` (Lightning's default)."""
    if trainer.get("enable_progress_bar") is False or not sys.stdout.isatty():
        return None
    named = [str(getattr(c, "class_path", type(c).__name__)) for c in trainer.get("callbacks") or []]
    if any(name.endswith("ProgressBar") for name in named) or importlib.util.find_spec("rich") is None:
        return None
    from lightning.pytorch.callbacks import RichProgressBar

    return RichProgressBar()
