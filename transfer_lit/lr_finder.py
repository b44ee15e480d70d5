"""LRFinder: find one global learning-rate multiplier, keeping the ratios between parameter groups.

Lightning's learning-rate finder writes a single learning rate into every optimizer group, which
erases differential (head vs backbone) and layer-wise learning rates. This one sweeps the module's
``lr_scale``, a scalar that the LR gate multiplies into every group's learning rate during
``optimizer.step()`` only (:func:`transfer_lit.freezing.gates.install_lr_gate`). Schedulers never see it,
so their ``base_lrs`` and state stay untouched, and the ratios between groups hold by construction.
The chosen ``lr_scale`` is saved in the module's checkpoints.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from transfer_lit.protocols import LRScalable

Suggestion = Literal["steepest", "min_loss"]


class LRFinder(Callback):
    """Before training, sweep ``model.lr_scale`` exponentially, then train with the suggested value.

    From the CLI: ``transfer-lit fit --config ... --trainer.callbacks+=transfer_lit.LRFinder``.

    The sweep runs ``num_steps`` optimizer steps on training batches with whatever is trainable at
    the start (the head alone in ``progressive`` mode), then restores the weights, BatchNorm
    statistics, optimizer, gradient scaler and random-number state, so training starts exactly as
    it would have, with ``lr_scale`` = the suggestion. Every group's effective learning rate is its
    scheduled learning rate x its gate x ``lr_scale``. The suggestion is logged as ``lr_scale``;
    to reuse it without a sweep, multiply ``model.lr`` by it (all group learning rates follow
    ``model.lr``). It is skipped when resuming (the checkpoint holds the chosen ``lr_scale``).

    Args:
        min_scale: first ``lr_scale`` of the sweep.
        max_scale: last ``lr_scale`` of the sweep.
        num_steps: optimizer steps in the sweep (training batches are reused if there are fewer).
        suggestion: ``steepest`` (steepest descent of the smoothed loss) or ``min_loss``
            (the ``lr_scale`` of the lowest smoothed loss, divided by 10).
        smoothing: exponential smoothing of the loss curve (0 = none).
        divergence_threshold: stop early once the smoothed loss exceeds this x its minimum.
        curve_file: optional CSV file receiving ``lr_scale,loss,smoothed_loss`` of the sweep.
    """

    def __init__(
        self,
        min_scale: float = 1e-3,
        max_scale: float = 1e3,
        num_steps: int = 100,
        suggestion: Suggestion = "steepest",
        smoothing: float = 0.9,
        divergence_threshold: float = 4.0,
        curve_file: str | None = None,
    ) -> None:
        if not 0 < min_scale < max_scale:
            raise ValueError(f"LRFinder needs 0 < min_scale < max_scale, got min_scale={min_scale}, "
                             f"max_scale={max_scale}")
        if num_steps < 3:
            raise ValueError(f"LRFinder.num_steps must be >= 3, got {num_steps}")
        if suggestion not in ("steepest", "min_loss"):
            raise ValueError(f"LRFinder.suggestion must be 'steepest' or 'min_loss', got {suggestion!r}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"LRFinder.smoothing must be in [0, 1), got {smoothing}")
        self.min_scale, self.max_scale, self.num_steps = min_scale, max_scale, num_steps
        self.suggestion_method, self.smoothing = suggestion, smoothing
        self.divergence_threshold, self.curve_file = divergence_threshold, curve_file
        self.scales: list[float] = []
        self.losses: list[float] = []
        self.suggestion: float | None = None

    def scale_at(self, step: int) -> float:
        """``lr_scale`` at sweep step ``step`` (exponential from ``min_scale`` to ``max_scale``)."""
        return self.min_scale * (self.max_scale / self.min_scale) ** (step / (self.num_steps - 1))

    def smoothed(self) -> list[float]:
        """The sweep's losses, exponentially smoothed with bias correction."""
        out, avg = [], 0.0
        for i, loss in enumerate(self.losses):
            avg = self.smoothing * avg + (1 - self.smoothing) * loss
            out.append(avg / (1 - self.smoothing ** (i + 1)))
        return out

    def suggest(self) -> float | None:
        """The suggested ``lr_scale`` from the recorded sweep, or ``None`` if it is too short."""
        losses = self.smoothed()
        if len(losses) < 3:
            return None
        if self.suggestion_method == "min_loss":
            return self.scales[min(range(len(losses)), key=losses.__getitem__)] / 10
        logs = [math.log(s) for s in self.scales]
        slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(losses) - 1)]
        start = len(slopes) // 10  # the first points are dominated by smoothing start-up
        best = min(range(start, len(slopes)), key=slopes.__getitem__)
        return self.scales[best + 1]

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, LRScalable):
            raise TypeError(f"LRFinder needs a transfer_lit.TransferModule (the LRScalable protocol: lr_scale, "
                            f"freezing, batch_logits, loss), got {type(pl_module).__name__}")
        module: Any = pl_module
        if self.suggestion is not None or trainer.global_step > 0:
            if self.suggestion is None:
                rank_zero_warn(f"LRFinder: resuming a run that did not use it; keeping lr_scale={module.lr_scale}")
            return
        if module.freezing.unwrapped_refusal() is not None:
            strategy = type(trainer.strategy).__name__
            raise ValueError(f"LRFinder does not support {strategy} (sharded weights cannot be snapshotted here); "
                             "run it on one device or with strategy ddp, then multiply model.lr by its suggestion")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"LRFinder needs exactly one optimizer, got {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        saved_model = copy.deepcopy(module.state_dict())
        saved_optimizer = copy.deepcopy(optimizer.state_dict())
        saved_scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        saved_rng = torch.get_rng_state()
        saved_cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        saved_scale, was_training = module.lr_scale, module.training
        try:
            self._sweep(trainer, module, optimizer, scaler)
        finally:
            module.load_state_dict(saved_model)
            optimizer.load_state_dict(saved_optimizer)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.load_state_dict(saved_scaler)
            torch.set_rng_state(saved_rng)
            if saved_cuda_rng is not None:
                torch.cuda.set_rng_state_all(saved_cuda_rng)
            module.lr_scale = saved_scale
            module.train(was_training)
        suggestion = self.suggest()
        # Every rank swept its own data shard; rank 0 decides for all.
        suggestion = trainer.strategy.broadcast(suggestion, src=0)
        if suggestion is None:
            rank_zero_warn(f"LRFinder: the loss diverged after {len(self.losses)} steps; keeping lr_scale={saved_scale}"
                           "; lower min_scale")
            return
        self.suggestion = float(suggestion)
        module.lr_scale = self.suggestion
        lrs = {g["name"]: f"{g['lr'] * self.suggestion:.3g}" for g in optimizer.param_groups
               if "name" in g and not g["name"].endswith(".no_decay")}
        rank_zero_info(f"LRFinder: suggested lr_scale={self.suggestion:.4g} ({self.suggestion_method}, "
                       f"{len(self.losses)} steps); base learning rates become {lrs}")
        for logger in trainer.loggers:
            logger.log_metrics({"lr_scale": self.suggestion}, step=trainer.global_step)
        self._write_curve()

    def _sweep(self, trainer: pl.Trainer, pl_module: Any, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        loader = trainer.train_dataloader
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise ValueError(f"LRFinder needs a single training DataLoader, got {type(loader).__name__}")
        self.scales, self.losses = [], []
        pl_module.train()
        batches = iter(loader)
        best = math.inf
        end = object()  # not None: a None batch is one whose images were all skipped as unreadable
        for step in range(self.num_steps):
            batch = next(batches, end)
            if batch is end:
                batches = iter(loader)
                batch = next(batches)
            if batch is None:
                continue
            batch = trainer.precision_plugin.convert_input(batch)  # as Lightning's loops do, before the transfer
            batch = trainer.strategy.batch_to_device(batch)
            pl_module.lr_scale = self.scale_at(step)
            optimizer.zero_grad(set_to_none=True)
            with trainer.precision_plugin.train_step_context():
                loss = pl_module.loss(pl_module.batch_logits(batch), batch[1])
            if not torch.isfinite(loss):
                break
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            self.scales.append(pl_module.lr_scale)
            self.losses.append(float(loss.detach()))
            smoothed = self.smoothed()[-1]
            best = min(best, smoothed)
            if smoothed > self.divergence_threshold * best:
                break

    @rank_zero_only
    def _write_curve(self) -> None:
        if self.curve_file is None:
            return
        path = Path(self.curve_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["lr_scale", "loss", "smoothed_loss"])
            writer.writerows(zip(self.scales, self.losses, self.smoothed(), strict=True))

    # ------------------------------------------------------------------ checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"suggestion": self.suggestion}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.suggestion = state_dict.get("suggestion")
