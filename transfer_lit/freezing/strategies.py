"""One object per training strategy owns everything freezing does differently under it.

:func:`build_freezing` picks it from the trainer's strategy (``TransferModule.configure_freezing``, which
:class:`~transfer_lit.freezing.FreezingHooks` calls in every stage's ``setup``); nothing else in
transfer_lit looks at the strategy's type, and what other parts need to know they ask this object
(``unwrapped_refusal``, ``compares_checkpoint_shapes``, ``allows_fused_optimizer``). What differs:

* :class:`FreezingStrategy` itself (one process): frozen parameters have ``requires_grad=False``, so they
  get no gradients, no optimizer state, and backward stops at the first trainable block.
* :class:`DDPFreezing` (DDP, more than one process): the same, plus the parameters frozen when DDP
  wraps the model are left out of DDP and synced here (:class:`ThawedGradientSync`): DDP all-reduces
  only what required grad at wrap time, so a block thawed later would train on each rank's own
  gradients and the ranks would silently diverge.
* :class:`GateOnlyFreezing` (FSDP): sharded parameters cannot change ``requires_grad`` after wrapping;
  every parameter stays trainable, frozen blocks are held still by their zero LR gate, their gradients
  zeroed (the optimizer state dict of a sharded unit needs state for every parameter), and a block that
  thaws restarts its optimizer state.
* :class:`DeepSpeedFreezing`: gate-only, and progressive unfreezing is refused (not supported).

:meth:`FreezingStrategy.hold` is the one place where frozen gradients are dropped, right before the
optimizer step and before gradient clipping (so frozen gradients never count in the clipping norm).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn

from transfer_lit.backbones.base import Backbone
from transfer_lit.freezing.blocks import BNPolicy, batchnorms, set_requires_grad
from transfer_lit.freezing.gates import gated_params


class FreezingStrategy:
    """Freezing on one device: ``requires_grad=False`` for frozen blocks. Subclasses adapt it to a strategy."""

    #: The strategy shards parameters (FSDP, DeepSpeed).
    shards_parameters: bool = False

    def unwrapped_refusal(self) -> str | None:
        """Why the backbone cannot run or be snapshotted outside the wrapped model (the feature cache and the LR
        finder need to), or ``None`` when it can."""
        if self.shards_parameters:
            return "the strategy shards the parameters (FSDP / DeepSpeed), so they cannot be used outside the model"
        return None

    @property
    def compares_checkpoint_shapes(self) -> bool:
        """Whether a checkpoint's tensors have the model's shapes (sharded strategies hold flat shards)."""
        return not self.shards_parameters

    @property
    def allows_fused_optimizer(self) -> bool:
        """Whether the optimizer may become the fused one on CUDA (not for sharded parameters)."""
        return not self.shards_parameters

    def check_mode(self, mode: str) -> None:
        """Raise ``ValueError`` when ``model.mode`` cannot run under this strategy."""

    def apply(self, backbone: Backbone, frozen: set[str], bn_policy: BNPolicy) -> None:
        """Make exactly the ``frozen`` blocks frozen (and every BatchNorm under ``bn_policy='frozen'``)."""
        set_requires_grad(backbone, frozen, bn_policy)

    def on_thaw(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
        """Blocks holding ``params`` were just thawed (nothing to do: they have no optimizer state yet)."""

    def hold(self, optimizer: torch.optim.Optimizer, backbone: Backbone, bn_policy: BNPolicy) -> None:
        """Before each optimizer step: no update for the parameters of groups whose gate is 0 (their gradients are
        dropped, so the optimizer keeps no state for them)."""
        for p in gated_params(optimizer):
            p.grad = None

    def before_wrap(self, module: nn.Module) -> None:
        """In ``setup``, before the strategy wraps ``module``."""

    def on_fit_start(self, module: nn.Module) -> None:
        """Once the processes are up and the model is wrapped, before the first step."""

    def after_backward(self) -> None:
        """After each backward pass, on every process."""


class DDPFreezing(FreezingStrategy):
    """DDP with more than one process: blocks frozen at wrap time are synced by :class:`ThawedGradientSync`."""

    def __init__(self) -> None:
        self.sync = ThawedGradientSync()

    def before_wrap(self, module: nn.Module) -> None:
        # Lightning's DDPStrategy passes this attribute on to DistributedDataParallel.
        module._ddp_params_and_buffers_to_ignore = self.sync.take_frozen(module)  # type: ignore[assignment]

    def on_fit_start(self, module: nn.Module) -> None:
        # Frozen after before_wrap took its list (a subclass freezing in setup or configure_model): DDP holds them,
        # and once thawed they would need DDP's reducer to know them. Say so rather than train them half-synced.
        taken = {id(p) for p in self.sync.params}
        late = [n for n, p in module.named_parameters() if not p.requires_grad and id(p) not in taken]
        if late:
            raise ValueError(f"parameters {late[:4]} ({len(late)} in all) were frozen after DDP wrapped the model "
                             f"(e.g. in setup); freeze blocks in __init__ or through the ProgressiveUnfreezing "
                             f"schedule, so that the thawed-gradient sync covers them")
        self.sync.broadcast()

    def after_backward(self) -> None:
        # Right after backward, rather than before the optimizer step: under fp16 the grad scaler checks the
        # gradients for inf before that, and every rank must see the same (averaged) gradients then. Under
        # accumulation each micro-batch's reduce is exact: what earlier ones added is the same on every rank.
        self.sync.all_reduce()


class GateOnlyFreezing(FreezingStrategy):
    """FSDP: every parameter stays trainable; frozen ones are held by a zero gate and zeroed gradients."""

    shards_parameters = True

    def apply(self, backbone: Backbone, frozen: set[str], bn_policy: BNPolicy) -> None:
        set_requires_grad(backbone, frozen, bn_policy, trainable=True)

    def on_thaw(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
        # Frozen, they took zero-gradient steps (moments zero, but step counters advanced): start afresh.
        reset_optimizer_state(optimizer, params)

    def hold(self, optimizer: torch.optim.Optimizer, backbone: Backbone, bn_policy: BNPolicy) -> None:
        held = gated_params(optimizer)
        if bn_policy == "frozen":  # BatchNorm shares its block's group and gate, but never trains
            held += [p for m in batchnorms(backbone.modules()) for p in m.parameters(False)]
        for p in held:
            if p.grad is not None:
                p.grad.zero_()


class DeepSpeedFreezing(GateOnlyFreezing):
    """DeepSpeed: gate-only freezing; progressive unfreezing is not supported."""

    def check_mode(self, mode: str) -> None:
        if mode == "progressive":
            raise ValueError("model.mode='progressive' is not supported with DeepSpeed; use strategy ddp or fsdp")


def build_freezing(strategy: Strategy, world_size: int) -> FreezingStrategy:
    """The freezing strategy for a trainer's ``strategy`` (the only place that looks at its type)."""
    if isinstance(strategy, DeepSpeedStrategy):  # before DDP: DeepSpeedStrategy subclasses DDPStrategy
        return DeepSpeedFreezing()
    if isinstance(strategy, FSDPStrategy):
        return GateOnlyFreezing()
    if isinstance(strategy, DDPStrategy) and world_size > 1:  # ddp_spawn and user subclasses are DDP too
        return DDPFreezing()
    return FreezingStrategy()


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Zero the optimizer state (moments, step) of ``params``: a block that starts training starts afresh."""
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                value.zero_()


class ThawedGradientSync:
    """All-reduces the gradients of parameters DDP was told to ignore.

    Every parameter frozen at wrap time is left out of DDP (``_ddp_params_and_buffers_to_ignore``) and synced
    here: its initial value broadcast from rank 0, its gradients averaged in one flat all-reduce after each
    backward.
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

