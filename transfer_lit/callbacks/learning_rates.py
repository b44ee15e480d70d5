"""LearningRates: the effective learning rates of the head and the backbone, in two logged columns.

Lightning's ``LearningRateMonitor`` logs one column per optimizer group: ``lr-AdamW/head``, ``head.no_decay``,
``backbone.<block>`` and ``backbone.<block>.no_decay`` for every block (~40 for MobileNetV2), each the scheduled
``group["lr"]``, which stays the same while the block is frozen. What trains is ``group["lr"] x gate x
lr_scale`` (:mod:`transfer_lit.freezing.gates`); this callback logs that, for the two groups that carry the
information. ``LearningRateMonitor`` still works when added to ``trainer.callbacks``.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from transfer_lit.protocols import LRScalable


def effective_lrs(optimizer: Optimizer, lr_scale: float = 1.0) -> dict[str, float]:
    """``{"lr-head": ..., "lr-backbone": ...}``: ``lr x gate x lr_scale`` of the head's group and of the
    output-side backbone block whose gate is above 0 (``0.0`` while every block is frozen).

    Groups are matched by their ``block`` key (``head``, ``backbone.<block>``) in the optimizer's order, which is
    the backbone's block order (input -> output) then the head. A ``.bn`` group under ``bn_policy='train_bn'`` has
    no gate (it trains while its block is frozen) and does not count as a thawed block. An optimizer without
    ``block`` keys (not built by ``TransferModule``) gives ``{}``.
    """
    def effective(group: dict[str, Any]) -> float:
        return float(group["lr"]) * float(group.get("gate", 1.0)) * lr_scale

    gated = [g for g in optimizer.param_groups if "block" in g and not g.get("ungated", False)]
    head = [g for g in gated if g["block"] == "head"]
    backbone = [g for g in gated if str(g["block"]).startswith("backbone.")]
    lrs = {"lr-head": effective(head[0])} if head else {}
    if backbone:
        thawed = [g for g in backbone if g.get("gate", 1.0) > 0]
        lrs["lr-backbone"] = effective(thawed[-1]) if thawed else 0.0
    return lrs


class LearningRates(Callback):
    """Log ``lr-head`` and ``lr-backbone``: the learning rates that ``optimizer.step()`` applies.

    ``lr-head`` is the head's group ``lr x gate x model.lr_scale``; ``lr-backbone`` is the same for the
    output-side backbone block that trains (gate above 0), ``0.0`` while every block is frozen. Every other
    block's learning rate is a fixed multiple of it: ``model.layer_decay`` times less per block towards the input
    (equal with ``layer_decay: 1``), times its own warm-up gate for the steps just after its thaw
    (``ProgressiveUnfreezing(warmup_steps=...)``). For one column per optimizer group, add Lightning's
    ``LearningRateMonitor`` to ``trainer.callbacks``.

    Args:
        logging_interval: ``epoch``: once per epoch, at its start (after the thaws of ``ProgressiveUnfreezing``
            listed before this callback); ``step``: at the start of every ``trainer.log_every_n_steps``-th
            optimizer step (its warm-up gates included), as ``LearningRateMonitor(logging_interval="step")``.
    """

    def __init__(self, logging_interval: Literal["epoch", "step"] = "epoch") -> None:
        if logging_interval not in ("epoch", "step"):
            raise ValueError(f"LearningRates(logging_interval={logging_interval!r}): valid values are 'epoch' and "
                             f"'step'")
        self.logging_interval = logging_interval
        self._warned = False
        self._logged_step = -1

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._logged_step = -1
        if not trainer.loggers:
            raise MisconfigurationException("LearningRates logs to the trainer's logger, and trainer.logger is "
                                            "false; set a logger or remove the callback")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.logging_interval == "epoch":
            self._log(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Inside optimizer.step() the groups hold the gated LR already: read them before it, after the warm-up's
        # gates for this step; once per optimizer step (the first batch of an accumulation).
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's logger connector
        step = trainer.global_step
        if self.logging_interval == "step" and every and (step + 1) % every == 0 and step != self._logged_step:
            self._logged_step = step
            self._log(trainer, pl_module)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            return
        lrs = effective_lrs(trainer.optimizers[0], pl_module.lr_scale if isinstance(pl_module, LRScalable) else 1.0)
        if not lrs:
            if not self._warned:
                self._warned = True
                rank_zero_warn("LearningRates: the optimizer has no transfer_lit parameter groups (no 'block' keys), "
                               "so nothing is logged; add lightning's LearningRateMonitor to trainer.callbacks")
            return
        for logger in trainer.loggers:
            logger.log_metrics(lrs, step=trainer.global_step)
