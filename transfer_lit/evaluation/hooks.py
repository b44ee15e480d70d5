"""EvaluationHooks: logs a module's epoch metrics, fits its :class:`~transfer_lit.evaluation.Decision` to each
validation epoch and hands the threshold to the test metrics; attached by the module itself
(``configure_callbacks``) and bound to it, so a research override of ``on_validation_epoch_end`` without
``super()`` loses none of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from transfer_lit.evaluation.report import Predictions, write_report


class EvaluationHooks(Callback):
    """Each stage's epoch metrics, logged once per epoch. After each validation epoch (before checkpoints are
    saved) ``owner.decision`` is fitted to its stored logits, so every checkpoint's temperature and threshold fit
    its own weights, logged as ``val_temperature`` / ``val_threshold``. Before a test epoch, the test metrics get
    the decision threshold. At the end of ``test``, and of ``fit`` (on the last validation epoch), the evaluation
    report goes next to the checkpoint (:func:`report_folder`).

    Args:
        owner: the ``TransferModule`` (``decision``, ``metrics``, ``probabilities``) it serves.
    """

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.last_val: tuple[torch.Tensor, torch.Tensor] | None = None  # the last validation epoch's logits

    def log_epoch(self, stage: str) -> None:
        # Once per epoch: each self.log of a Metric walks Lightning's result collection (~80 ms/step on CPU).
        self.owner.log_dict(self.owner.metrics.epoch_values(stage, self.owner.class_names), prog_bar=stage == "val")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module is self.owner:
            self.log_epoch("train")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module is not self.owner:
            return
        owner: Any = self.owner
        self.log_epoch("val")
        logits, target = owner.metrics.val_store.epoch()
        owner.metrics.val_store.reset()
        if trainer.sanity_checking:
            return
        self.last_val = (logits.cpu(), target.cpu())
        if owner.decision.fitted:
            owner.decision.fit(logits, target, owner.probabilities)
            pl_module.log_dict({f"val_{k}": v for k, v in owner.decision.state_dict().items()})

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module is self.owner:
            owner: Any = self.owner
            owner.metrics.set_threshold(owner.decision.threshold)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module is self.owner and self.last_val is not None:
            self.write(trainer, "val", *self.last_val)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module is not self.owner:
            return
        self.log_epoch("test")
        owner: Any = self.owner
        logits, target = owner.metrics.test_store.epoch()
        owner.metrics.test_store.reset()
        self.write(trainer, "test", logits.cpu(), target.cpu())

    def write(self, trainer: pl.Trainer, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        """The evaluation report of ``stage`` (:mod:`~transfer_lit.evaluation.report`) next to the checkpoint."""
        owner: Any = self.owner
        folder = report_folder(trainer, stage)
        if folder is None or not trainer.is_global_zero or owner.task == "multilabel" or len(target) == 0:
            return
        with torch.no_grad():
            probs = owner.probabilities(owner.decision.scale(logits.to(owner.device))).cpu()
        predictions = Predictions.from_probabilities(probs, target, owner.class_names, owner.decision.threshold)
        extra = owner.decision.state_dict() if owner.decision.fitted else {}
        logger = trainer.logger
        metrics_csv = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
        try:
            files, hint = write_report(predictions, folder, stage, extra, metrics_csv)
        except OSError as error:  # a full disk or a read-only folder must not lose the run: say so, go on
            rank_zero_warn(f"transfer_lit: the {stage} report could not be written to {folder}: {error}")
            return
        rank_zero_info(f"transfer_lit: {stage} report in {folder}: {', '.join(f.name for f in files)}"
                       + (f" ({hint})" if hint else ""))


def report_folder(trainer: pl.Trainer, stage: str) -> Path | None:
    """Next to the checkpoint: the tested one's folder, else the checkpoint callback's, else the logger's; ``None``
    when the run keeps neither checkpoints nor logs."""
    if stage == "test" and trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
        return Path(trainer.ckpt_path).parent
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if dirpath:
        return Path(dirpath)
    return Path(trainer.log_dir) if trainer.logger is not None and trainer.log_dir else None
