"""Freezing: what a frozen block is (:mod:`.blocks`), the LR gate (:mod:`.gates`) and one object per training
strategy that owns every strategy-specific step (:mod:`.strategies`)."""

from transfer_lit.freezing.blocks import BNPolicy, Mode, batchnorms, check_modes, set_batchnorm_modes, set_requires_grad
from transfer_lit.freezing.frozen import FrozenBlocks
from transfer_lit.freezing.gates import group_by_name, install_lr_gate, set_gate
from transfer_lit.freezing.hooks import FreezingHooks
from transfer_lit.freezing.strategies import (
    DDPFreezing,
    DeepSpeedFreezing,
    FreezingStrategy,
    GateOnlyFreezing,
    ThawedGradientSync,
    build_freezing,
    reset_optimizer_state,
)

__all__ = [
    "BNPolicy",
    "DDPFreezing",
    "DeepSpeedFreezing",
    "FreezingHooks",
    "FreezingStrategy",
    "FrozenBlocks",
    "GateOnlyFreezing",
    "Mode",
    "ThawedGradientSync",
    "batchnorms",
    "build_freezing",
    "check_modes",
    "group_by_name",
    "install_lr_gate",
    "reset_optimizer_state",
    "set_batchnorm_modes",
    "set_gate",
    "set_requires_grad",
]
