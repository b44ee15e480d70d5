"""One-call recipes built on the same callback and module as every config: :func:`fine_tune` (fastai's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, Trainer

from transfer_lit.callbacks.progressive import ProgressiveUnfreezing
from transfer_lit.module import TransferModule
from transfer_lit.schedulers import WarmupDecay


def fine_tune(model: TransferModule, datamodule: LightningDataModule | None = None, epochs: int = 1,
              freeze_epochs: int = 1, lr_scale: float = 0.5, callbacks: Sequence[Callback] = (),
              train_dataloaders: Any = None, val_dataloaders: Any = None, **trainer_kwargs: Any) -> Trainer:
    """fastai's ``fine_tune``: the head alone for ``freeze_epochs``, then every block for ``epochs``, at
    ``lr_scale`` x the learning rates with the LR schedule started over. Returns the fitted ``Trainer``.

    It is a :class:`~transfer_lit.ProgressiveUnfreezing` schedule
    ``{freeze_epochs: {blocks: all, lr_scale: 0.5, restart_schedule: true}}`` on ``trainer.max_epochs =
    freeze_epochs + epochs``. A model without ``lr_scheduler`` gets :class:`~transfer_lit.schedulers.WarmupDecay`
    (30% warm-up, cosine decay, stepped per batch), as fastai's one-cycle; the differential learning rates are
    the model's own (``backbone_lr_mult``, ``layer_decay``), fastai's ``lr_mult``.

    Args:
        model: a ``TransferModule`` with ``mode='progressive'``.
        datamodule: the data (or give ``train_dataloaders`` / ``val_dataloaders``).
        epochs: epochs with every block thawed.
        freeze_epochs: epochs of the head alone first.
        lr_scale: learning-rate multiplier from the thaw on (fastai halves it).
        callbacks: more callbacks for the trainer.
        train_dataloaders: instead of ``datamodule``.
        val_dataloaders: with ``train_dataloaders``.
        trainer_kwargs: passed to ``Trainer`` (``accelerator``, ``logger``, ...).

    Example::

        model = TransferModule(TorchvisionBackbone("resnet50", "IMAGENET1K_V2"), num_classes=2, mode="progressive")
        trainer = fine_tune(model, ImageDataModule("data/pets"), epochs=4)
    """
    if model.mode != "progressive":
        raise ValueError(f"fine_tune needs a TransferModule with mode='progressive' (it starts with the backbone "
                         f"frozen), got mode={model.mode!r}")
    for key, value, least in (("epochs", epochs, 1), ("freeze_epochs", freeze_epochs, 0)):
        if value < least:
            raise ValueError(f"fine_tune: {key} must be >= {least}, got {value}")
    if "max_epochs" in trainer_kwargs:
        raise ValueError("fine_tune sets max_epochs = freeze_epochs + epochs; give those instead")
    if model.recipe.scheduler is None:
        model.recipe = dataclasses.replace(model.recipe, scheduler=partial(WarmupDecay, warmup=0.3, decay="cosine"),
                                           interval="step")
    thaw = ProgressiveUnfreezing(schedule={freeze_epochs: {"blocks": "all", "lr_scale": lr_scale,
                                                           "restart_schedule": True}})
    trainer = Trainer(max_epochs=freeze_epochs + epochs, callbacks=[thaw, *callbacks], **trainer_kwargs)
    trainer.fit(model, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders, datamodule=datamodule)
    return trainer
