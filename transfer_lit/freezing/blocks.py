"""What freezing a backbone block means, whatever the strategy: ``requires_grad`` and BatchNorm modes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from torch import nn

from transfer_lit.backbones.base import Backbone

Mode = Literal["linear_probe", "finetune", "progressive"]
BNPolicy = Literal["train", "train_bn", "eval", "frozen"]
BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def batchnorms(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The BatchNorm layers (any dimension, synced or not) among ``modules``."""
    return [m for m in modules if isinstance(m, BN_TYPES)]


def set_requires_grad(backbone: Backbone, frozen: set[str], bn_policy: BNPolicy, trainable: bool = False) -> None:
    """``requires_grad`` off for the parameters of ``frozen`` blocks (and of every BatchNorm when ``frozen``).

    Under ``train_bn`` the BatchNorm affine parameters of frozen blocks stay trainable (their own ``.bn`` groups, which
    no gate holds: :func:`~transfer_lit.param_groups.build_param_groups`).

    ``trainable=True`` (sharded strategies) keeps every parameter trainable instead: they cannot change it after
    wrapping, so frozen blocks are held by their zero LR gate and the freezing strategy's ``hold`` step.
    """
    for block, params in backbone.block_params().items():
        for _, p in params:
            p.requires_grad_(trainable or block not in frozen)
    if bn_policy in ("frozen", "train_bn"):
        for m in batchnorms(backbone.modules()):
            m.requires_grad_(trainable or bn_policy == "train_bn")


def check_modes(mode: str, bn_policy: str) -> None:
    """Raise ``ValueError`` naming ``model.mode`` / ``model.bn_policy`` for an unknown value, or a policy the mode
    cannot honour."""
    for key, value, valid in (("mode", mode, get_args(Mode)), ("bn_policy", bn_policy, get_args(BNPolicy))):
        if value not in valid:
            raise ValueError(f"model.{key} must be one of {list(valid)}, got {value!r}")
    if bn_policy == "train_bn" and mode == "linear_probe":
        raise ValueError("model.bn_policy='train_bn' trains the BatchNorm layers of frozen blocks, but "
                         "model.mode='linear_probe' runs the whole backbone frozen in eval mode; use mode "
                         "'progressive' (or bn_policy 'eval')")


def set_batchnorm_modes(backbone: Backbone, frozen: set[str], bn_policy: BNPolicy) -> None:
    """Eval mode (pretrained statistics) for the BatchNorm of frozen blocks (``eval``) or of all (``frozen``);
    ``train`` and ``train_bn`` leave every BatchNorm in the module's mode (batch statistics while training)."""
    eval_blocks = frozen if bn_policy == "eval" else set()
    for block in eval_blocks:
        for m in batchnorms(backbone.block_modules(block)):
            m.eval()
    if bn_policy == "frozen":
        for m in batchnorms(backbone.modules()):
            m.eval()
