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
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.optim import Optimizer


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
