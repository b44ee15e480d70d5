"""The loss and the class probabilities of each classification task (``multiclass``, ``binary``, ``multilabel``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfer_lit.metrics import Task


def classification_loss(task: Task, logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None,
                        label_smoothing: float) -> torch.Tensor:
    """Cross-entropy (multiclass) or binary cross-entropy with logits, with label smoothing and class weights."""
    if task == "multiclass":
        return F.cross_entropy(logits, target, weight=class_weights, label_smoothing=label_smoothing)
    target_f = target.float().view_as(logits)
    smoothed = target_f * (1 - label_smoothing) + 0.5 * label_smoothing
    losses = F.binary_cross_entropy_with_logits(logits.float(), smoothed, reduction="none")
    if class_weights is not None:
        weights = class_weights[target.long()].view_as(logits) if task == "binary" else class_weights
        losses = losses * weights
    return losses.mean()


def class_probabilities(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """Softmax for multiclass, sigmoid otherwise (binary: probability of class 1, shape ``(batch,)``)."""
    if task == "multiclass":
        return logits.float().softmax(-1)
    probs = logits.float().sigmoid()
    return probs.squeeze(-1) if task == "binary" else probs
