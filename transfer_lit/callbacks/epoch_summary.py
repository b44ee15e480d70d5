"""EpochSummary: one line of validation metrics per epoch when there is no progress bar to show them."""

from __future__ import annotations

import math

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def validation_summary(trainer: Trainer) -> str:
    """``val_acc=0.9500  val_loss=0.1234 ...``: the trainer's current validation metrics, sorted, or ``""``; an
    undefined one (NaN: ``val_auroc`` of a split that lacks a class) is ``n/a``."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    return "  ".join(f"{k}=n/a" if math.isnan(v) else f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


class EpochSummary(Callback):
    """Print ``epoch N: val_acc=... val_loss=...`` after each validation epoch, on rank 0, when the trainer has no
    progress bar (``trainer.enable_progress_bar: false``, batch jobs, CI logs); with one, it shows them already."""

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        shown = validation_summary(trainer)
        if shown:
            print(f"transfer-lit: epoch {trainer.current_epoch}: {shown}", flush=True)
