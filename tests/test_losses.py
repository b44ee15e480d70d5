"""Task losses and probabilities (transfer_lit.losses) against their definitions written out by hand."""

from __future__ import annotations

import pytest
import torch

from transfer_lit.losses import class_probabilities, classification_loss


def test_multiclass_is_cross_entropy_with_smoothing_and_weights() -> None:
    logits, target = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 2])
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss = classification_loss("multiclass", logits, target, weights, 0.1)
    logp = logits.log_softmax(-1)
    smoothed = torch.full((2, 3), 0.1 / 3) + torch.nn.functional.one_hot(target, 3) * 0.9
    per_sample = -(smoothed * logp * weights).sum(-1)
    assert loss == pytest.approx(float(per_sample.sum() / weights[target].sum()), rel=1e-6)


def test_binary_is_bce_with_smoothing_towards_one_half_and_per_class_weights() -> None:
    logits, target = torch.tensor([[1.5], [-0.5]]), torch.tensor([1, 0])
    loss = classification_loss("binary", logits, target, torch.tensor([2.0, 1.0]), 0.2)
    soft = torch.tensor([[0.9], [0.1]])  # 1 -> 0.9, 0 -> 0.1
    bce = -(soft * logits.sigmoid().log() + (1 - soft) * (1 - logits.sigmoid()).log())
    assert loss == pytest.approx(float((bce * torch.tensor([[1.0], [2.0]])).mean()), rel=1e-6)


def test_probabilities_per_task() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, -2.0]])
    assert torch.allclose(class_probabilities("multiclass", logits).sum(-1), torch.ones(2))
    assert class_probabilities("binary", logits[:, :1]).shape == (2,)
    assert torch.allclose(class_probabilities("multilabel", logits), logits.sigmoid())
