"""Named optimizer parameter groups and the learning-rate gate.

Every group exists from step 0 and never changes, so any torch scheduler composes with
progressive unfreezing and optimizer / scheduler state resumes cleanly. A group is switched
on and off by a *gate* in ``[0, 1]`` stored in the group itself (``group["gate"]``, so it is
saved with the optimizer state). The gate and a global ``lr_scale`` are applied around each
``optimizer.step()`` only, leaving ``group["lr"]`` to the scheduler::

    effective lr = group["lr"] (base lr x schedule) x gate x lr_scale
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Adam, AdamW, Optimizer

from transfer_lit.backbones.base import Backbone

_NO_DECAY_NAMES = ("class_token", "cls_token", "pos_embed", "pos_embedding", "relative_position_bias_table")


@dataclass(frozen=True)
class LearningRatePolicy:
    """How learning rates spread over the network.

    Args:
        lr: learning rate of the head.
        backbone_lr_mult: backbone learning rate = ``lr * backbone_lr_mult`` (output-side block).
        layer_decay: each block closer to the input gets ``layer_decay`` times the LR of the next one
            (1.0 = the same LR for every block).
        weight_decay: decoupled weight decay of the decay groups (norms and biases get none).
    """

    lr: float = 1e-3
    backbone_lr_mult: float = 0.01
    layer_decay: float = 1.0
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        for key in ("lr", "backbone_lr_mult", "layer_decay"):
            value = getattr(self, key)
            if not value > 0:
                raise ValueError(f"model.{key} must be positive, got {value!r}")
        if self.weight_decay < 0:
            raise ValueError(f"model.weight_decay must be >= 0, got {self.weight_decay!r}")

    def block_lrs(self, blocks: list[str]) -> dict[str, float]:
        """Learning rate of each backbone block; the input-side block gets the smallest."""
        top = self.lr * self.backbone_lr_mult
        n = len(blocks)
        return {block: top * self.layer_decay ** (n - 1 - i) for i, block in enumerate(blocks)}


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or any(key in name for key in _NO_DECAY_NAMES)


def _split(prefix: str, named: Iterable[tuple[str, nn.Parameter]], lr: float, wd: float) -> list[dict[str, Any]]:
    named = list(named)
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    groups = []
    if decay:
        groups.append({"name": prefix, "params": decay, "lr": lr, "weight_decay": wd, "block": prefix, "gate": 1.0})
    if no_decay:
        name = f"{prefix}.no_decay"
        groups.append({"name": name, "params": no_decay, "lr": lr, "weight_decay": 0.0, "block": prefix, "gate": 1.0})
    return groups


def build_param_groups(backbone: Backbone, head: nn.Module, policy: LearningRatePolicy) -> list[dict[str, Any]]:
    """One decay and one no-decay group per backbone block (``backbone.<block>``) and for the head.

    Membership is by parameter identity (``Backbone.blocks`` walks ``named_parameters``), never by value.
    Groups carry ``name`` (for LearningRateMonitor), ``block`` and ``gate`` keys.
    """
    blocks = backbone.blocks()
    lrs = policy.block_lrs(list(blocks))
    groups: list[dict[str, Any]] = []
    for block, named in blocks.items():
        groups += _split(f"backbone.{block}", named, lrs[block], policy.weight_decay)
    groups += _split("head", head.named_parameters(), policy.lr, policy.weight_decay)
    seen: set[int] = set()
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError("a parameter is shared between the backbone and the head; this is not supported")
            seen.add(id(p))
    return groups


def prefer_fused(optimizer: Optimizer, devices: tuple[str, ...] = ("cuda",)) -> Optimizer:
    """The same Adam / AdamW, same groups, with ``fused=True`` when the user chose no implementation and every
    parameter is a float on one of ``devices``: one kernel per group and step instead of a dozen, with the step
    counters on the device (``foreach`` keeps them on the host). Anything else is returned as it is.

    The fused optimizer takes part in mixed precision like any other: gradients are unscaled (fp16) before
    hooks and clipping see them, which Lightning requires to clip (it refuses optimizers that unscale
    internally). Loading a state dict saved without ``fused`` keeps it fused.

    Args:
        optimizer: the optimizer built by the user's factory, with the groups it made.
        devices: device types where the fused implementation is preferred.
    """
    defaults = optimizer.defaults
    chosen = defaults.get("fused") is not None or defaults.get("foreach") is not None
    chosen = chosen or bool(defaults.get("capturable")) or bool(defaults.get("differentiable"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    on_devices = all(p.device.type in devices and p.is_floating_point() for p in params)
    if type(optimizer) not in (AdamW, Adam) or chosen or not on_devices:
        return optimizer
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold Adam's decoupled_weight_decay
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    fused = type(optimizer)(groups, **{**kwargs, "fused": True, "foreach": None})
    fused._step_supports_amp_scaling = False  # type: ignore[attr-defined]  # GradScaler unscales first, as usual

    def keep_fused(opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # load_state_dict replaces the groups, flags included: a checkpoint of a foreach run would undo fused.
        state_dict["param_groups"] = [{**g, "fused": True, "foreach": None} for g in state_dict["param_groups"]]
        return state_dict

    fused.register_load_state_dict_pre_hook(keep_fused)
    return fused


def install_lr_gate(optimizer: Optimizer, lr_scale: Callable[[], float], drop_frozen_grads: bool = True) -> None:
    """Apply ``gate x lr_scale()`` to each group's LR for the duration of ``optimizer.step()`` only.

    With ``drop_frozen_grads``, groups whose gate is 0 also have their gradients dropped first, so the
    optimizer keeps no state for them. FSDP needs them kept (its optimizer state dict wants state for
    every parameter of a sharded unit): there the module zeroes those gradients instead.
    """
    saved: list[float] = []

    def pre_hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        saved.clear()
        scale = lr_scale()
        for group in opt.param_groups:
            saved.append(group["lr"])
            gate = group.get("gate", 1.0)
            if gate == 0.0 and drop_frozen_grads:
                for p in group["params"]:
                    p.grad = None
            group["lr"] = group["lr"] * gate * scale

    def post_hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(opt.param_groups, saved, strict=True):
            group["lr"] = lr

    optimizer.register_step_pre_hook(pre_hook)
    optimizer.register_step_post_hook(post_hook)


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
            group["gate"] = float(value)
            found = True
    if not found:
        valid = sorted({g["block"] for g in optimizer.param_groups if "block" in g})
        raise KeyError(f"no parameter group for block {block!r}; valid: {valid}")
