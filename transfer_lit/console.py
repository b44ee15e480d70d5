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
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

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
