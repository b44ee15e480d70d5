"""Stop at a NaN or infinite training loss with a diagnosis, without stalling the GPU to look.

Reading a CUDA value on the host (``bool(torch.isfinite(loss))``) makes the CPU wait until the GPU has
finished everything queued, every step: the next step cannot be queued while the current one runs. So on
CUDA the check is *deferred*: the loss and whether the input batch was finite are copied to pinned host
memory asynchronously, and read two steps later, when the copy has long landed. Elsewhere (CPU) a read
costs nothing and the check is immediate.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message says where."""


@dataclass(frozen=True)
class NonFiniteLoss:
    """A non-finite training loss as found by :class:`LossWatch`."""

    loss: float
    step: int
    epoch: int
    input_finite: bool
    steps_late: int  # optimizer steps taken since (0 when the check was immediate)


@dataclass
class _Pending:
    values: torch.Tensor  # host: [loss, input finite (1 / 0)]
    wait: Callable[[], None]
    step: int
    epoch: int


class LossWatch:
    """Watches each training loss; :meth:`watch` returns the first non-finite one it has seen.

    Deferred, a step's values are read ``lag`` steps later: by then the GPU has long finished that step, so
    waiting for its copy costs nothing, and every DDP rank reads the same step at the same time (a rank
    that stopped while the others went on into the next all-reduce would hang them).

    Args:
        deferred: copy the values to the host asynchronously (CUDA) instead of reading them at once.
        lag: deferred only: how many steps later a step's values are read.
    """

    def __init__(self, deferred: bool, lag: int = 2) -> None:
        self.deferred, self.lag = deferred, lag
        self.pending: deque[_Pending] = deque()

    def watch(self, loss: torch.Tensor, x: object, step: int, epoch: int) -> NonFiniteLoss | None:
        """Record this step's loss (and input ``x`` when it is a tensor); report any non-finite loss seen."""
        loss = loss.detach().float().reshape(())
        if not self.deferred:  # a device sync where the loss lives on one
            value = loss.item()
            if math.isfinite(value):
                return None
            return _report(value, not isinstance(x, torch.Tensor) or bool(torch.isfinite(x).all()), step, epoch, 0)
        input_finite = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else torch.ones_like(loss)
        values = torch.stack([loss, input_finite.to(loss.dtype)])
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append(_Pending(host, event.synchronize, step, epoch))
        else:  # deferred on a device whose values are host memory already (tests exercise the CUDA logic on CPU)
            self.pending.append(_Pending(values, lambda: None, step, epoch))
        return self._collect(step, keep=self.lag)

    def flush(self, step: int) -> NonFiniteLoss | None:
        """Wait for and check every pending value (before validation, at epoch end, before a checkpoint)."""
        return self._collect(step, keep=0)

    def _collect(self, step: int, keep: int) -> NonFiniteLoss | None:
        while len(self.pending) > keep:
            oldest = self.pending.popleft()
            oldest.wait()
            loss, input_finite = _read_host_copy(oldest.values)
            found = _report(loss, input_finite, oldest.step, oldest.epoch, step - oldest.step)
            if found is not None:
                self.pending.clear()
                return found
        return None


def _read_host_copy(values: torch.Tensor) -> list[float]:
    """Values already copied to host memory: reading them waits for nothing."""
    return values.tolist()


def _report(loss: float, input_finite: float | bool, step: int, epoch: int, steps_late: int) -> NonFiniteLoss | None:
    if not math.isfinite(loss):
        return NonFiniteLoss(loss, step, epoch, bool(input_finite), steps_late)
    return None


def _group_of(optimizer: torch.optim.Optimizer | None, param: nn.Parameter, name: str) -> tuple[str, float | None]:
    """Name and learning rate of the optimizer group holding ``param``."""
    for group in optimizer.param_groups if optimizer is not None else []:
        if any(q is param for q in group["params"]):
            return str(group.get("name", "?")), float(group["lr"])
    return ("head" if name.startswith("head.") else "backbone"), None


def diagnose(
    found: NonFiniteLoss,
    named_parameters: Iterator[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer | None,
    x: object = None,
) -> str:
    """The error message for ``found``: where it happened and the likeliest cause (input, weights, overflow).

    Args:
        found: what :class:`LossWatch` reported.
        named_parameters: the model's parameters, as they are now.
        optimizer: the optimizer, to name the group (and LR) of a parameter.
        x: the step's input batch when the check was immediate, for a count of its non-finite values.
    """
    where = f"training loss is {found.loss} at global step {found.step} (epoch {found.epoch})"
    if found.steps_late:
        where += (f", seen {found.steps_late} step(s) later (on GPUs the check runs behind the device so that it "
                  f"never stalls it; the weights below are after those steps)")
    fix = "lower model.lr / model.backbone_lr_mult or clip gradients (trainer.gradient_clip_val)"
    named = list(named_parameters)
    broken = next(((n, p) for n, p in named if not torch.isfinite(p).all()), None)
    # Late, the weights took the non-finite step's update: a bad input is then the better clue.
    if not found.input_finite and (broken is None or found.steps_late):
        count = " non-finite values"
        if isinstance(x, torch.Tensor) and not found.steps_late:
            count = f" {int((~torch.isfinite(x)).sum())} non-finite value(s) of {x.numel()}"
        weights = ", with finite weights" if broken is None else ""
        return (f"{where}: the input batch holds{count}{weights}; check the data and the preprocessing "
                f"(a tiny preprocessing.std overflows)")
    if broken is not None:
        group, lr = _group_of(optimizer, broken[1], broken[0])
        return f"{where}: parameter {broken[0]} of group {group!r} (lr {lr}) holds non-finite values; {fix}"
    name, p = max(named, key=lambda item: float(item[1].detach().abs().max()))
    group, lr = _group_of(optimizer, p, name)
    largest = float(p.detach().abs().max())
    return (f"{where}: inputs and weights are finite but the forward pass overflowed; the largest weights, "
            f"|w| = {largest:.3g}, are in parameter {name} of group {group!r} (lr {lr}); {fix}")


class FiniteCheck(Callback):
    """Stops a fit at the first non-finite training loss, with a diagnosis (attached by ``TransferModule`` when
    ``model.check_finite``): immediate where a read is free (CPU), two steps late when the step is sync-free.

    Every pending loss is read before a validation, at an epoch's end and before a checkpoint is written, so
    none of them goes ahead with weights a NaN step broke. The loss it sees is Lightning's (divided by
    ``accumulate_grad_batches``, scaled under fp16), which is non-finite exactly when the step's loss is.

    Args:
        owner: the module it checks (a reused Trainer may run other modules later: it leaves those alone).
        deferred: called at the start of each fit: whether to defer (the module's sync-free setting).
    """

    def __init__(self, owner: nn.Module, deferred: Callable[[], bool] = lambda: False) -> None:
        self.owner, self.deferred = owner, deferred
        self.watch = LossWatch(deferred=False)
        self._inputs: object = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.watch = LossWatch(deferred=self.deferred())  # before the sanity check; nothing left from a last fit

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._inputs = batch[0] if isinstance(batch, list | tuple) and batch else None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        inputs, self._inputs = self._inputs, None  # not kept alive (on the device) until the next batch
        if pl_module is self.owner:
            self._raise(self.watch.watch(loss, inputs, trainer.global_step, trainer.current_epoch), trainer,
                        pl_module, inputs)

    def flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read every pending loss (fits only)."""
        if trainer.state.fn == "fit" and pl_module is self.owner:
            self._raise(self.watch.flush(trainer.global_step), trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.flush(trainer, pl_module)

    @staticmethod
    def _raise(found: NonFiniteLoss | None, trainer: pl.Trainer, model: nn.Module, inputs: object = None) -> None:
        if found is not None:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            raise NonFiniteLossError(diagnose(found, model.named_parameters(), optimizer, inputs))
