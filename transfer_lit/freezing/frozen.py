"""Which backbone blocks are frozen, and the one writer of the optimizer's gates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from transfer_lit.backbones.base import Backbone
from transfer_lit.freezing.blocks import BNPolicy, set_batchnorm_modes
from transfer_lit.freezing.gates import set_gate
from transfer_lit.freezing.strategies import FreezingStrategy


class FrozenBlocks:
    """The frozen blocks of one backbone, applied through the run's :class:`FreezingStrategy`.

    A block is frozen or thawed by :meth:`freeze_exactly`; a thawed block's learning rate may be ramped by a gate
    in ``[0, 1]`` (:meth:`set_gates`, the warm-up). :meth:`write_gates` is the only place that writes the
    optimizer's gates: 0 for frozen blocks, the warm-up gate (else 1) for the others.

    Args:
        backbone: the backbone whose blocks are frozen.
        bn_policy: BatchNorm of frozen blocks (``train``, ``eval`` or ``frozen``).
    """

    def __init__(self, backbone: Backbone, bn_policy: BNPolicy) -> None:
        self.backbone, self.bn_policy = backbone, bn_policy
        self.names = backbone.block_names()  # read once: write_gates runs every step of a warm-up
        self.strategy = FreezingStrategy()  # one process until the module's setup knows the trainer's strategy
        self.blocks: set[str] = set()
        self.gates: dict[str, float] = {}

    def freeze_exactly(self, blocks: Iterable[str], optimizer: torch.optim.Optimizer | None) -> None:
        """Freeze exactly ``blocks`` and thaw the rest: ``requires_grad`` (per the strategy) and the gates.

        Raises:
            KeyError: naming the unknown blocks and the valid ones.
        """
        blocks = set(blocks)
        unknown = blocks - set(self.names)
        if unknown:
            raise KeyError(f"unknown backbone block(s) {sorted(unknown)}; valid blocks are {self.names}")
        thawed_now = self.blocks - blocks
        for block in thawed_now | (blocks - self.blocks):  # a block that changes state starts a new warm-up
            self.gates.pop(block, None)
        self.blocks = blocks
        self.strategy.apply(self.backbone, blocks, self.bn_policy)
        if optimizer is not None and thawed_now:
            params = self.backbone.block_params()
            self.strategy.on_thaw(optimizer, [p for b in thawed_now for _, p in params[b]])
        self.write_gates(optimizer)

    def carve(self, patterns: Mapping[str, str]) -> None:
        """New blocks of the parameters matching each ``{name: regex}`` (:meth:`Backbone.carve`), frozen if the block
        they came from is; call before the optimizer is built (``setup``) and re-apply with ``freeze_exactly``."""
        self.backbone.carve(patterns)
        self.names = self.backbone.block_names()
        self.blocks |= {name for name, parent in self.backbone.carved_blocks().items() if parent in self.blocks}

    def set_gates(self, gates: Mapping[str, float], optimizer: torch.optim.Optimizer | None) -> None:
        """Warm-up gates of thawed blocks (frozen blocks stay at 0 whatever is given)."""
        self.gates.update(gates)
        self.write_gates(optimizer, gates)  # only these: a warm-up calls this every step

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """A new optimizer: no warm-up carried over from an earlier one; every block's gate written into it."""
        self.gates.clear()
        self.write_gates(optimizer)

    def write_gates(self, optimizer: torch.optim.Optimizer | None, blocks: Iterable[str] | None = None) -> None:
        """Write the gate of ``blocks`` (default: every block) into ``optimizer``'s groups (nothing before the
        optimizer exists)."""
        if optimizer is None:
            return
        for block in self.names if blocks is None else blocks:
            set_gate(optimizer, f"backbone.{block}", 0.0 if block in self.blocks else self.gates.get(block, 1.0))

    def set_batchnorm_modes(self, whole_backbone: bool = False) -> None:
        """After a ``.train()``: BatchNorm of frozen blocks back in eval mode (``eval`` and ``frozen`` policies), or
        the whole backbone (``whole_backbone``: a linear probe's backbone runs in eval mode throughout)."""
        if whole_backbone:
            self.backbone.eval()
        else:
            set_batchnorm_modes(self.backbone, self.blocks, self.bn_policy)

    def hold(self, optimizer: torch.optim.Optimizer) -> None:
        """Before each optimizer step: drop (or zero) the gradients of frozen blocks, per the strategy."""
        self.strategy.hold(optimizer, self.backbone, self.bn_policy)
