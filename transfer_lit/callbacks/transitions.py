"""Metric-driven unfreezing phases: when a monitored metric has stopped improving (:class:`Plateau`), and what that
means for the phases of :class:`~transfer_lit.ProgressiveUnfreezing` (:class:`MetricTransitions`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_lit.callbacks.phases import Phase


class Plateau:
    """Tracks the best value of a metric and how many checks in a row failed to beat it by ``min_delta``.

    Args:
        monitor: the metric's name (for messages).
        mode: ``min`` (lower is better, e.g. ``val_loss``) or ``max`` (``val_acc``).
        patience: checks without improvement after which the metric has plateaued.
        min_delta: an improvement smaller than this does not count.
    """

    def __init__(self, monitor: str, mode: Literal["min", "max"] = "min", patience: int = 1,
                 min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ProgressiveUnfreezing.monitor_mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"ProgressiveUnfreezing.patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"ProgressiveUnfreezing.min_delta must be >= 0, got {min_delta}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.wait = 0

    def update(self, value: float) -> bool:
        """Record one check; ``True`` when ``value`` is a new best. A NaN never improves."""
        better = not math.isnan(value) and (
            self.best is None
            or (value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta))
        if better:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return better

    @property
    def plateaued(self) -> bool:
        """``patience`` checks in a row without a new best."""
        return self.wait >= self.patience

    def reset(self) -> None:
        """A new phase: no best yet."""
        self.best, self.wait = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.wait = int(state["wait"])


class MetricTransitions:
    """The metric-driven rule of a schedule: a phase ends when :class:`Plateau` says so or after its length in the
    schedule; the last one ends training. Keeps the running phase's best weights for ``restore_best``.

    ``starts`` (the epoch each phase after the head-only one starts at) is the callback's; this appends to it.
    """

    def __init__(self, plateau: Plateau, last_phase_epochs: int | None, restore_best: bool) -> None:
        self.plateau, self.last_phase_epochs, self.restore_best = plateau, last_phase_epochs, restore_best
        self.best_weights: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        """A new phase (or a new run): no best value, no best weights."""
        self.plateau.reset()
        self.best_weights = None

    def end_capped(self, phases: Sequence[Phase], starts: list[float], epoch: int) -> None:
        """At the start of ``epoch``: a phase that has run its length in the schedule ends now."""
        while (k := sum(1 for s in starts if s <= epoch)) < len(phases):
            start = starts[k - 1] if k else 0
            if epoch - start < phases[k].epoch - (phases[k - 1].epoch if k else 0):
                return
            starts.append(epoch)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: int, phases: Sequence[Phase],
              starts: list[float]) -> None:
        """After a validation run of ``phase``: maybe the next phase starts at the next epoch, or training stops."""
        epoch, monitor = trainer.current_epoch, self.plateau.monitor
        if phase < len(phases) and starts and starts[-1] > epoch:
            return  # the next phase already starts at the next epoch
        if monitor not in trainer.callback_metrics:
            raise ValueError(f"ProgressiveUnfreezing.monitor={monitor!r} is not a logged metric; "
                             f"logged: {sorted(trainer.callback_metrics)}")
        value = float(trainer.strategy.broadcast(float(trainer.callback_metrics[monitor]), src=0))  # one decision
        if self.plateau.update(value) and self.restore_best:
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        if phase == len(phases):
            since = epoch + 1 - (starts[-1] if starts else 0)
            capped = self.last_phase_epochs is not None and since >= self.last_phase_epochs
            if self.plateau.plateaued or capped:
                why = f"{monitor} stopped improving" if self.plateau.plateaued else f"it ran {since} epoch(s)"
                rank_zero_info(f"ProgressiveUnfreezing: the last phase ended ({why}): training stops")
                trainer.should_stop = True
        elif self.plateau.plateaued:
            rank_zero_info(f"ProgressiveUnfreezing: phase {phase} ended at epoch {epoch} ({monitor} best "
                           f"{self.plateau.best:.4g}, no improvement in {self.plateau.wait} validation run(s)); "
                           f"phase {phase + 1} starts at epoch {epoch + 1}")
            starts.append(epoch + 1)

    def restore(self, pl_module: pl.LightningModule, phase: int) -> None:
        """The ended ``phase``'s best weights back into ``pl_module`` (``restore_best``), then a fresh phase."""
        if self.best_weights is not None:
            pl_module.load_state_dict(self.best_weights)
            rank_zero_info(f"ProgressiveUnfreezing: restored the best weights of phase {phase} "
                           f"({self.plateau.monitor}={self.plateau.best:.4g})")
        self.reset()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"plateau": self.plateau.state_dict()}
        if self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])
        self.best_weights = state.get("best_weights")
