"""Learning-rate schedules that keep each parameter group's own learning rate.

Any torch scheduler works with transfer_lit's parameter groups, since they never change during a
run. Two gaps are filled here for YAML configs:

* ``LambdaLR`` needs a callable; :class:`LinearWarmup` is one that can be written in YAML::

      lr_scheduler:
        class_path: torch.optim.lr_scheduler.LambdaLR
        init_args:
          lr_lambda: {class_path: transfer_lit.schedulers.LinearWarmup, init_args: {warmup_steps: 100}}

* torch's ``OneCycleLR`` takes one ``max_lr`` for every group (a YAML config cannot list one per
  group), which flattens differential learning rates; :class:`OneCycleLR` peaks each group at its
  own learning rate times ``max_lr_factor``.

:class:`WarmupDecay` (ULMFiT's slanted triangular schedule, BERT's warm-up then linear decay) is sized from
the run itself: the module tells it the run's length (:class:`RunLengthAware`), so a recipe never carries a
literal step count that goes stale when the data or ``max_epochs`` change.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Protocol, runtime_checkable

import torch
from torch.optim import Optimizer


@runtime_checkable
class RunLengthAware(Protocol):
    """A scheduler that is told the run's length (in its own steps) once the trainer knows it."""

    def set_total_steps(self, total_steps: int) -> None:
        """Size the schedule to ``total_steps`` scheduler steps."""


class WarmupDecay(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up to each group's own learning rate, then linear (or cosine) decay to ``final_factor`` x it.

    With ``warmup=0.1``, ``decay='linear'`` this is ULMFiT's slanted triangular schedule and BERT's fine-tuning
    schedule. ``TransferModule`` sizes it to the run (``trainer.estimated_stepping_batches`` with
    ``model.scheduler_interval: step``, ``max_epochs`` with ``epoch``) unless ``total_steps`` is given::

        lr_scheduler: {class_path: transfer_lit.schedulers.WarmupDecay, init_args: {warmup: 0.1}}
        scheduler_interval: step

    Args:
        optimizer: the optimizer (passed by the module).
        warmup: warm-up length: a fraction of the run (< 1) or a number of steps (>= 1).
        decay: ``linear`` or ``cosine`` after the warm-up.
        final_factor: the learning rate at the end, as a fraction of the peak.
        total_steps: the run's length in scheduler steps; ``None`` = sized by the module from the trainer.
    """

    def __init__(self, optimizer: Optimizer, warmup: float = 0.1, decay: Literal["linear", "cosine"] = "linear",
                 final_factor: float = 0.0, total_steps: int | None = None) -> None:
        if warmup < 0:
            raise ValueError(f"WarmupDecay.warmup must be >= 0 (a fraction < 1 or a step count), got {warmup}")
        if decay not in ("linear", "cosine"):
            raise ValueError(f"WarmupDecay.decay must be 'linear' or 'cosine', got {decay!r}")
        if not 0.0 <= final_factor <= 1.0:
            raise ValueError(f"WarmupDecay.final_factor must be in [0, 1], got {final_factor}")
        self.warmup, self.decay, self.final_factor = warmup, decay, final_factor
        self.total_steps = total_steps
        super().__init__(optimizer)

    def set_total_steps(self, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"WarmupDecay: the run has {total_steps} scheduler steps; it needs at least 1")
        self.total_steps = total_steps
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def factor(self, step: int) -> float:
        """The learning-rate multiplier at scheduler step ``step`` (0-based)."""
        total = self.total_steps or 1
        warmup = min(total, round(self.warmup * total) if self.warmup < 1 else int(self.warmup))
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.final_factor + (1 - self.final_factor) * shape

    def get_lr(self) -> list[float | torch.Tensor]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class LinearWarmup:
    """``LambdaLR`` factor: linear warm-up to 1 over ``warmup_steps`` scheduler steps, then constant.

    Args:
        warmup_steps: the factor is ``(step + 1) / warmup_steps`` until it reaches 1 (0 = no warm-up).
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 0:
            raise ValueError(f"LinearWarmup.warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """One-cycle policy whose peak for each group is that group's own learning rate x ``max_lr_factor``.

    Args:
        optimizer: the optimizer (passed by the module).
        total_steps: scheduler steps in the cycle: with ``model.scheduler_interval: step``, the
            number of optimizer steps of the run (``max_epochs x batches per epoch / accumulation``).
        max_lr_factor: peak learning rate of each group = its configured learning rate x this.
        pct_start: share of the cycle spent increasing the learning rate.
        anneal_strategy: ``cos`` or ``linear``.
        cycle_momentum: cycle momentum (``betas[0]`` for Adam) inversely to the learning rate.
        base_momentum: lowest momentum of the cycle.
        max_momentum: highest momentum of the cycle.
        div_factor: initial learning rate = peak / ``div_factor``.
        final_div_factor: final learning rate = initial / ``final_div_factor``.
        three_phase: use the three-phase variant of the schedule.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        max_lr_factor: float = 1.0,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ) -> None:
        if max_lr_factor <= 0:
            raise ValueError(f"OneCycleLR.max_lr_factor must be positive, got {max_lr_factor}")
        max_lr = [group["lr"] * max_lr_factor for group in optimizer.param_groups]
        super().__init__(
            optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal_strategy,
            cycle_momentum=cycle_momentum, base_momentum=base_momentum, max_momentum=max_momentum,
            div_factor=div_factor, final_div_factor=final_div_factor, three_phase=three_phase,
        )


def check_restartable(scheduler: object) -> str | None:
    """``None`` when :func:`restart` can start ``scheduler`` over, else why not."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return "ReduceLROnPlateau follows a metric, it has no schedule to restart"
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return "OneCycleLR has a fixed total_steps and fails past it; use transfer_lit.schedulers.WarmupDecay"
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return f"{type(scheduler).__name__} is not a torch LRScheduler"
    return None


def restart(scheduler: torch.optim.lr_scheduler.LRScheduler, steps_left: int) -> None:
    """Start ``scheduler`` over from its first step, each group back at its base learning rate, as if built now; a
    :class:`RunLengthAware` one is sized to the ``steps_left`` in the run."""
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base
    if isinstance(scheduler, RunLengthAware):
        scheduler.set_total_steps(max(1, steps_left))
    scheduler.last_epoch = -1
    with warnings.catch_warnings():  # "step() before optimizer.step()": this is the constructor's own first step
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def scale_lrs(optimizer: Optimizer, schedulers: list[object], factor: float) -> None:
    """Every group's learning rate x ``factor``, in the optimizer and in the schedulers' base learning rates."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    for scheduler in schedulers:
        if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # type: ignore[assignment]
