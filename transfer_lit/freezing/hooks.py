"""FreezingHooks: the training hooks of the run's freezing strategy, attached by the module itself.

``TransferModule.configure_callbacks`` returns it, so a research subclass that overrides
``on_after_backward`` or ``on_before_optimizer_step`` without calling ``super()`` cannot switch off the
DDP sync of thawed blocks or the hold on frozen gradients.
"""

from __future__ import annotations

from typing import cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from transfer_lit.protocols import Freezable


class FreezingHooks(Callback):
    """Chooses the module's freezing strategy in ``setup`` and runs its steps at the right moments.

    Works with any module that follows :class:`~transfer_lit.protocols.Freezable`, as ``TransferModule`` does.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, Freezable):
            raise TypeError(f"FreezingHooks needs a transfer_lit.TransferModule (the Freezable protocol), got "
                            f"{type(pl_module).__name__}")
        module = pl_module
        strategy = module.configure_freezing()
        strategy.check_mode(module.mode)
        module.frozen.strategy = strategy
        module.set_frozen_blocks(module.frozen_blocks)  # as the strategy means it (gate-only: all trainable)
        strategy.before_wrap(module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cast(Freezable, pl_module).frozen.strategy.on_fit_start()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cast(Freezable, pl_module).frozen.strategy.after_backward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        cast(Freezable, pl_module).frozen.hold(optimizer)
