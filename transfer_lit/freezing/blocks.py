"""What freezing a backbone block means, whatever the strategy: ``requires_grad`` and BatchNorm modes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from torch import nn

from transfer_lit.backbones.base import Backbone

BNPolicy = Literal["train", "eval", "frozen"]
BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def batchnorms(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The BatchNorm layers (any dimension, synced or not) among ``modules``."""
    return [m for m in modules if isinstance(m, BN_TYPES)]


def set_requires_grad(backbone: Backbone, frozen: set[str], bn_policy: BNPolicy, trainable: bool = False) -> None:
    """``requires_grad`` off for the parameters of ``frozen`` blocks (and of every BatchNorm when ``frozen``).

    ``trainable=True`` (sharded strategies) keeps every parameter trainable instead: they cannot change it after
    wrapping, so frozen blocks are held by their zero LR gate and the freezing strategy's ``hold`` step.
    """
    for block, params in backbone.block_params().items():
        for _, p in params:
            p.requires_grad_(trainable or block not in frozen)
    if bn_policy == "frozen":
        for m in batchnorms(backbone.modules()):
            m.requires_grad_(trainable)


def set_batchnorm_modes(backbone: Backbone, frozen: set[str], bn_policy: BNPolicy) -> None:
    """Eval mode (pretrained statistics) for the BatchNorm of frozen blocks (``eval``) or of all (``frozen``)."""
    eval_blocks = frozen if bn_policy == "eval" else set()
    for block in eval_blocks:
        for m in batchnorms(backbone.block_modules(block)):
            m.eval()
    if bn_policy == "frozen":
        for m in batchnorms(backbone.modules()):
            m.eval()
