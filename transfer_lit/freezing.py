"""What freezing a backbone block means: ``requires_grad``, BatchNorm modes, held gradients, and the
gradients of blocks thawed after DDP wrapped the model (which DDP never all-reduces)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from transfer_lit.backbones.base import Backbone

BNPolicy = Literal["train", "eval", "frozen"]
BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def batchnorms(modules: Iterable[nn.Module]) -> list[nn.Module]:
    return [m for m in modules if isinstance(m, BN_TYPES)]


def set_requires_grad(backbone: Backbone, frozen: set[str], gate_only: bool, bn_policy: BNPolicy) -> None:
    """``requires_grad`` off for the parameters of ``frozen`` blocks (and of every BatchNorm when ``frozen``).

    ``gate_only`` (FSDP, DeepSpeed) keeps every parameter trainable: those strategies cannot change it after
    wrapping, so frozen blocks are held by a zero LR gate and :func:`hold_gradients` instead.
    """
    for block, params in backbone.blocks().items():
        for _, p in params:
            p.requires_grad_(gate_only or block not in frozen)
    if bn_policy == "frozen":
        for m in batchnorms(backbone.modules()):
            m.requires_grad_(gate_only)


def set_batchnorm_modes(backbone: Backbone, frozen: set[str], bn_policy: BNPolicy) -> None:
    """Eval mode (pretrained statistics) for the BatchNorm of frozen blocks (``eval``) or of all (``frozen``)."""
    eval_blocks = frozen if bn_policy == "eval" else set()
    for block in eval_blocks:
        for m in batchnorms(backbone.block_modules(block)):
            m.eval()
    if bn_policy == "frozen":
        for m in batchnorms(backbone.modules()):
            m.eval()


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Zero the optimizer state (moments, step) of ``params``: a block that starts training starts afresh."""
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                value.zero_()


def hold_gradients(optimizer: torch.optim.Optimizer, backbone: Backbone, gate_only: bool, bn_policy: BNPolicy) -> None:
    """Before each optimizer step: no update for the parameters of groups whose gate is 0.

    Their gradients are dropped, so the optimizer keeps no state for them; under ``gate_only`` (FSDP, whose
    optimizer state dict needs state for every parameter of a sharded unit) they are zeroed instead and take
    zero-gradient steps at zero LR.
    """
    held = [p for group in optimizer.param_groups if group.get("gate", 1.0) == 0.0 for p in group["params"]]
    if gate_only and bn_policy == "frozen":  # BatchNorm shares its block's gate
        held += [p for m in batchnorms(backbone.modules()) for p in m.parameters(False)]
    for p in held:
        if not gate_only:
            p.grad = None
        elif p.grad is not None:
            p.grad.zero_()


class ThawedGradientSync:
    """All-reduces the gradients of parameters DDP was told to ignore.

    DDP only all-reduces the parameters that require grad when it wraps the model; a block thawed later
    would train on each rank's own gradients and the ranks would silently diverge. So every parameter
    frozen at wrap time is left out of DDP (``_ddp_params_and_buffers_to_ignore``) and synced here: its
    initial value broadcast from rank 0, its gradients averaged in one flat all-reduce after each backward.
    """

    def __init__(self) -> None:
        self.params: list[nn.Parameter] = []

    def take_frozen(self, module: nn.Module) -> list[str]:
        """Take over the parameters of ``module`` that are frozen now; returns their names, for DDP to ignore."""
        frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        self.params = [p for _, p in frozen]
        return [n for n, _ in frozen]

    def broadcast(self) -> None:
        """Rank 0's values everywhere (DDP does not broadcast what it ignores)."""
        if self.params and torch.distributed.is_initialized():
            for p in self.params:
                torch.distributed.broadcast(p.data, src=0)

    def all_reduce(self) -> None:
        """Average the gradients over ranks (each rank must call it, after the same backward)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and torch.distributed.is_initialized():
            flat = torch._utils._flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(synced)
