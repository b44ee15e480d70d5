"""Named optimizer parameter groups: ``head``, ``backbone.<block>`` and their ``.no_decay`` twins.

Every group exists from step 0 with a ``block`` key and a ``gate`` (:mod:`transfer_lit.freezing.gates`),
so freezing a block never adds or removes a group and any scheduler composes with unfreezing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfer_lit.backbones.base import Backbone
from transfer_lit.freezing.blocks import batchnorms
from transfer_lit.freezing.frozen import FrozenBlocks
from transfer_lit.freezing.gates import install_lr_gate
from transfer_lit.schedulers import RunLengthAware
from transfer_lit.speed import build_optimizer

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


def _no_decay(name: str, param: nn.Parameter, declared: Collection[str]) -> bool:
    return (param.ndim <= 1 or any(key in name for key in _NO_DECAY_NAMES)
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in declared))


def _split(prefix: str, named: Iterable[tuple[str, nn.Parameter]], lr: float, wd: float,
           declared: Collection[str] = ()) -> list[dict[str, Any]]:
    named = list(named)
    decay = [p for n, p in named if not _no_decay(n, p, declared)]
    no_decay = [p for n, p in named if _no_decay(n, p, declared)]
    groups = []
    if decay:
        groups.append({"name": prefix, "params": decay, "lr": lr, "weight_decay": wd, "block": prefix, "gate": 1.0})
    if no_decay:
        name = f"{prefix}.no_decay"
        groups.append({"name": name, "params": no_decay, "lr": lr, "weight_decay": 0.0, "block": prefix, "gate": 1.0})
    return groups


def build_param_groups(backbone: Backbone, head: nn.Module, policy: LearningRatePolicy,
                       bn_policy: str = "eval") -> list[dict[str, Any]]:
    """One decay and one no-decay group per backbone block (``backbone.<block>``) and for the head.

    Membership is by parameter identity (``Backbone.block_params`` walks ``named_parameters``), never by value.
    Groups carry ``name`` (for LearningRateMonitor), ``block`` and ``gate`` keys. Under ``bn_policy='train_bn'`` a
    block's BatchNorm parameters get a ``backbone.<block>.bn`` group of their own, marked ``ungated``: they train
    while the block is frozen, so no gate holds them.
    """
    blocks = backbone.block_params()
    carved = backbone.carved_blocks()  # a carved block learns at the rate of the block it came from
    lrs = policy.block_lrs([b for b in blocks if b not in carved])
    lrs.update({name: lrs[parent] for name, parent in carved.items()})
    groups: list[dict[str, Any]] = []
    declared = backbone.no_weight_decay_names()
    for block, named in blocks.items():
        bn = ({id(p) for m in batchnorms(backbone.block_modules(block)) for p in m.parameters(recurse=False)}
              if bn_policy == "train_bn" else set())
        if bn:
            groups.append({"name": f"backbone.{block}.bn", "params": [p for _, p in named if id(p) in bn],
                           "lr": lrs[block], "weight_decay": 0.0, "block": f"backbone.{block}", "gate": 1.0,
                           "ungated": True})
            named = [(n, p) for n, p in named if id(p) not in bn]
        groups += _split(f"backbone.{block}", named, lrs[block], policy.weight_decay, declared)
    groups += _split("head", head.named_parameters(), policy.lr, policy.weight_decay)
    seen: set[int] = set()
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError("a parameter is shared between the backbone and the head; this is not supported")
            seen.add(id(p))
    return groups


def run_length(trainer: Any, interval: str) -> int:
    """The run's scheduler steps: optimizer steps (``interval='step'``) or ``max_epochs`` (``epoch``)."""
    if interval == "step":
        return int(trainer.estimated_stepping_batches)
    if trainer.max_epochs is None or trainer.max_epochs < 1:
        raise ValueError(f"a learning-rate schedule sized from the run needs trainer.max_epochs, got "
                         f"{trainer.max_epochs!r}; set it, use model.scheduler_interval=step, or give total_steps")
    return int(trainer.max_epochs)


@dataclass(frozen=True)
class OptimizerRecipe:
    """How a module's optimizer and scheduler are built from the user's factories.

    Args:
        optimizer: factory called with the named parameter groups.
        scheduler: optional factory called with the optimizer.
        interval: step the scheduler every ``epoch`` or every ``step``.
        monitor: metric ReduceLROnPlateau-style schedulers watch.
        policy: how learning rates spread over the groups.
    """

    optimizer: Callable[[Iterable[dict[str, Any]]], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], Any] | None
    interval: str
    monitor: str
    policy: LearningRatePolicy

    def build(self, backbone: Backbone, head: nn.Module, device: torch.device, frozen: FrozenBlocks,
              lr_scale: Callable[[], float], run_length: Callable[[str], int] | None = None) -> Any:
        """What ``configure_optimizers`` returns: the optimizer over every group (gated, fused where it helps) and,
        if any, the scheduler's Lightning config. ``run_length(interval)``: the run's scheduler steps, told to a
        :class:`~transfer_lit.schedulers.RunLengthAware` scheduler that was not given its length."""
        groups = build_param_groups(backbone, head, self.policy, frozen.bn_policy)
        optimizer = build_optimizer(self.optimizer, groups, device, allow_fused=frozen.strategy.allows_fused_optimizer)
        install_lr_gate(optimizer, lr_scale)
        frozen.attach(optimizer)
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if isinstance(scheduler, RunLengthAware) and getattr(scheduler, "total_steps", None) is None \
                and run_length is not None:
            scheduler.set_total_steps(run_length(self.interval))
        config = {"scheduler": scheduler, "interval": self.interval, "monitor": self.monitor}
        return {"optimizer": optimizer, "lr_scheduler": config}
