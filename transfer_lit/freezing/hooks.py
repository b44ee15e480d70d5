"""FreezingHooks: the training hooks of a module's freezing strategy, attached by the module itself.

``TransferModule.configure_callbacks`` returns one bound to the module, so a research subclass that
overrides ``on_after_backward`` or ``on_before_optimizer_step`` without calling ``super()`` cannot switch
off the DDP sync of thawed blocks or the hold on frozen gradients. Bound to its owner, it does nothing
for another module that a reused Trainer runs later.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from transfer_lit.freezing.gates import check_one_gated_optimizer
from transfer_lit.protocols import Freezable


class FreezingHooks(Callback):
    """Installs ``owner.configure_freezing()`` in ``setup`` and runs that strategy's steps at the right moments.

    Args:
        owner: the module (:class:`~transfer_lit.protocols.Freezable`, as ``TransferModule`` is) it serves.
    """

    def __init__(self, owner: Freezable) -> None:
        if not isinstance(owner, Freezable):
            raise TypeError(f"FreezingHooks needs a transfer_lit.TransferModule (the Freezable protocol), got "
                            f"{type(owner).__name__}")
        self.owner = owner

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module is self.owner:
            self.owner.install_freezing(self.owner.configure_freezing())
            self.owner.frozen.strategy.before_wrap(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module is self.owner:
            check_one_gated_optimizer(trainer.optimizers, needs_gates=bool(self.owner.frozen.blocks))
            self.owner.frozen.strategy.on_fit_start(pl_module)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module is self.owner:
            self.owner.frozen.strategy.after_backward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if pl_module is self.owner:
            self.owner.frozen.hold(optimizer)
