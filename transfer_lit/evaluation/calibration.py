"""Calibration: how far confidence is from accuracy (ECE, reliability bins) and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T`` fitted to minimise the negative
log-likelihood on held-out (validation) predictions. It changes no argmax, so accuracy stays as it was; only the
confidence moves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def per_class(probs: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` probabilities as they are; a binary task's ``(N,)`` P(class 1) as ``(N, 2)`` ``[P(0), P(1)]``."""
    return torch.stack([1 - probs, probs], dim=1) if probs.ndim == 1 else probs


def confidences(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and predicted class of each row: ``(N, C)`` probabilities, or ``(N,)`` of class 1 (binary)."""
    return per_class(probs).max(dim=1)


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, bins: int = 15
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean confidence, accuracy and sample count of ``bins`` equal-width confidence bins (the reliability diagram)."""
    confidence, predicted = confidences(probs.double())
    confidence = confidence.nan_to_num(0.0)
    correct = (predicted == target.long()).double()
    index = (confidence * bins).long().clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    mean_confidence = torch.bincount(index, confidence, minlength=bins) / count.clamp(min=1)
    accuracy = torch.bincount(index, correct, minlength=bins) / count.clamp(min=1)
    return mean_confidence, accuracy, count


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float:
    """ECE: the count-weighted mean of ``|accuracy - confidence|`` over equal-width confidence bins (top label)."""
    mean_confidence, accuracy, count = reliability_bins(probs, target, bins)
    return float(((accuracy - mean_confidence).abs() * count).sum() / count.sum().clamp(min=1))


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, binary: bool) -> float:
    """The temperature ``T`` that minimises the NLL of ``logits / T`` (``(N, C)``, or ``(N,)`` for binary).

    Fitted in log space (``T = exp(t)``, so it stays positive) with L-BFGS; 1.0 when there is nothing to fit.
    """
    logits, target = logits.detach().double().cpu(), target.detach().cpu()
    if logits.numel() == 0 or (not binary and target.unique().numel() < 2 and logits.shape[0] < 2):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / log_t.exp()
        loss = (F.binary_cross_entropy_with_logits(scaled, target.double()) if binary
                else F.cross_entropy(scaled, target.long()))
        loss.backward()
        return loss

    optimizer.step(nll)
    temperature = float(log_t.detach().exp())
    return temperature if 1e-2 <= temperature <= 1e2 else 1.0  # a degenerate fit (all correct): leave it alone


class TopLabelECE(Metric):
    """ECE of the top label over an epoch, from per-bin sums (synced across ranks by summing).

    Args:
        bins: equal-width confidence bins.
    """

    full_state_update = False
    higher_is_better = False
    count: torch.Tensor
    confidence: torch.Tensor
    correct: torch.Tensor

    def __init__(self, bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bins = bins
        for name in ("count", "confidence", "correct"):
            self.add_state(name, torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        confidence, predicted = confidences(probs.double())
        confidence = confidence.nan_to_num(0.0)  # a non-finite output (stopped elsewhere) must not index out of range
        index = (confidence * self.bins).long().clamp(0, self.bins - 1)
        dtype = self.count.dtype  # a precision plugin may have cast the states (true bf16)
        self.count.index_add_(0, index, torch.ones_like(confidence, dtype=dtype))
        self.confidence.index_add_(0, index, confidence.to(dtype))
        self.correct.index_add_(0, index, (predicted == target.long()).to(dtype))

    def compute(self) -> torch.Tensor:
        # sum over bins of count x |accuracy - confidence| = |correct - confidence sums|, per bin
        correct, confidence = self.correct.double(), self.confidence.double()
        return ((correct - confidence).abs().sum() / self.count.double().sum().clamp(min=1)).float()
