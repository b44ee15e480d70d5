"""What turns a model's logits into the probabilities and classes ``test`` and ``predict`` report: a temperature
and (binary tasks) a decision threshold, each fitted on the validation predictions of the same weights."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from transfer_lit.evaluation.calibration import fit_temperature
from transfer_lit.evaluation.thresholds import choose_threshold, parse_threshold_rule

Calibration = Literal["none", "temperature"]


class PredictionStore(Metric):
    """Every logit and target of an epoch (gathered from all ranks on ``compute``), for fitting a :class:`Decision`
    and for the evaluation report's curves."""

    full_state_update = False
    logits: list[torch.Tensor]
    target: list[torch.Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self._trailing: tuple[int, ...] | None = None  # a logit's shape: (1,) binary, (C,); restored by epoch()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self._trailing = tuple(logits.shape[1:])
        self.logits.append(logits.detach().float())
        self.target.append(target.detach())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.logits, list) and not self.logits:  # after a DDP sync the states are tensors
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return dim_zero_cat(self.logits), dim_zero_cat(self.target)

    def epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`compute` with an epoch of one sample kept one-dimensional (torchmetrics squeezes any one-element
        result of ``compute`` to a scalar: one image's binary logit and target)."""
        logits, target = self.compute()
        target = target.reshape(-1)
        if logits.numel() and self._trailing is not None and logits.shape[1:] != self._trailing:
            logits = logits.reshape(target.numel(), *self._trailing)
        return logits, target


class Decision:
    """The temperature and the decision threshold of a module, fitted on its validation predictions.

    Args:
        task: ``multiclass``, ``binary`` or ``multilabel``.
        calibration: ``temperature`` fits ``T`` after each validation epoch (``none``: ``T = 1``).
        threshold: binary tasks: a fixed probability, ``max_f1``, ``recall>=X`` or ``precision>=X`` (fitted on
            the calibrated validation probabilities).
    """

    def __init__(self, task: str, calibration: Calibration = "none", threshold: float | str = 0.5) -> None:
        if calibration not in ("none", "temperature"):
            raise ValueError(f"model.calibration must be one of ['none', 'temperature'], got {calibration!r}")
        self.rule, self.rule_value = parse_threshold_rule(threshold)
        if task != "binary" and not (self.rule == "fixed" and self.rule_value == 0.5):
            raise ValueError(f"model.threshold={threshold!r} is for task 'binary' (one decision threshold on the "
                             f"probability of class 1), not {task!r}")
        if task == "multilabel" and calibration != "none":
            raise ValueError("model.calibration='temperature' is for 'multiclass' and 'binary' tasks")
        self.task, self.calibration = task, calibration
        self.temperature = 1.0
        self.threshold = self.rule_value if self.rule == "fixed" else 0.5

    @property
    def fitted(self) -> bool:
        """Whether validation predictions decide anything (a temperature or a threshold rule)."""
        return self.calibration == "temperature" or self.rule != "fixed"

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits / T``."""
        return logits if self.temperature == 1.0 else logits / self.temperature

    def fit(self, logits: torch.Tensor, target: torch.Tensor, probabilities: Any) -> None:
        """Fit the temperature, then the threshold on ``probabilities(logits / T)``, to these predictions."""
        if logits.numel() == 0:
            return
        if self.calibration == "temperature":
            self.temperature = fit_temperature(logits.squeeze(-1) if self.task == "binary" else logits, target,
                                               binary=self.task == "binary")
        if self.rule != "fixed":
            self.threshold = choose_threshold(probabilities(self.scale(logits)), target, self.rule, self.rule_value)

    def state_dict(self) -> dict[str, float]:
        return {"temperature": self.temperature, "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.temperature = float(state.get("temperature", 1.0))
        if self.rule != "fixed":  # a threshold given on the command line wins over the checkpoint's
            self.threshold = float(state.get("threshold", self.threshold))
