"""The learning-rate gate: how an optimizer group is switched off (frozen) or ramped up (warm-up).

Every group exists from step 0 and never changes, so any torch scheduler composes with progressive
unfreezing and optimizer / scheduler state resumes cleanly. A group is switched on and off by a *gate*
in ``[0, 1]`` stored in the group itself (``group["gate"]``, so it is saved with the optimizer state).
The gate and a global ``lr_scale`` are applied around each ``optimizer.step()`` only, leaving
``group["lr"]`` to the scheduler::

    effective lr = group["lr"] (base lr x schedule) x gate x lr_scale

Only :class:`~transfer_lit.freezing.FrozenBlocks` writes gates (``TransferModule.set_frozen_blocks`` /
``set_block_gates`` go through it); a gate of 0 makes the group's parameters frozen, whose gradients the
freezing strategy's ``hold`` step drops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer


def install_lr_gate(optimizer: Optimizer, lr_scale: Callable[[], float]) -> None:
    """Apply ``gate x lr_scale()`` to each group's LR for the duration of ``optimizer.step()`` only."""
    saved: list[float] = []

    def pre_hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        saved.clear()
        scale = lr_scale()
        for group in opt.param_groups:
            saved.append(group["lr"])
            group["lr"] = group["lr"] * group.get("gate", 1.0) * scale

    def post_hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(opt.param_groups, saved, strict=True):
            group["lr"] = lr

    optimizer.register_step_pre_hook(pre_hook)
    optimizer.register_step_post_hook(post_hook)
    setattr(optimizer, _GATED, True)


_GATED = "_transfer_lit_gated"


def check_one_gated_optimizer(optimizers: list[Optimizer], needs_gates: bool) -> None:
    """Refuse a second optimizer, and (``needs_gates``: some block is or starts frozen) an optimizer without the gate.

    Frozen blocks and warm-ups act only through the gates of the one optimizer the module builds: any other
    optimizer would step frozen blocks at their full learning rate.
    """
    if len(optimizers) > 1:
        names = [type(o).__name__ for o in optimizers]
        raise ValueError(f"configure_optimizers returned {len(optimizers)} optimizers {names}; transfer_lit trains "
                         "with one: frozen blocks and warm-ups act through the LR gates of the optimizer the module "
                         "builds, so a second one would move frozen blocks at full learning rate. Put every "
                         "parameter group in one optimizer (extend TransferModule.configure_optimizers' groups)")
    if needs_gates and optimizers and not getattr(optimizers[0], _GATED, False):
        raise ValueError(f"configure_optimizers returned a {type(optimizers[0]).__name__} without transfer_lit's LR "
                         "gates, so frozen blocks would train; build it with OptimizerRecipe.build (as "
                         "TransferModule.configure_optimizers does) or call install_lr_gate on it")


def group_by_name(optimizer: Optimizer) -> dict[str, dict[str, Any]]:
    """The optimizer's groups keyed by their ``name``."""
    return {g["name"]: g for g in optimizer.param_groups if "name" in g}


def set_gate(optimizer: Optimizer, block: str, value: float) -> None:
    """Set the gate of every group of ``block`` (``head`` or ``backbone.<name>``)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"gate must be in [0, 1], got {value}")
    found = False
    for group in optimizer.param_groups:
        if group.get("block") == block:
            if not group.get("ungated", False):  # BatchNorm under bn_policy 'train_bn' trains whatever the gate
                group["gate"] = float(value)
            found = True
    if not found:
        valid = sorted({g["block"] for g in optimizer.param_groups if "block" in g})
        raise KeyError(f"no parameter group for block {block!r}; valid: {valid}")


def gated_params(optimizer: Optimizer) -> list[Any]:
    """Parameters of the groups whose gate is 0 (frozen)."""
    return [p for group in optimizer.param_groups if group.get("gate", 1.0) == 0.0 for p in group["params"]]
