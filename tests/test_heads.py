"""Head factories (transfer_lit.heads): called with the backbone's width, never a literal."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyBackbone
from torch import nn

from transfer_lit import LinearHead, MLPHead, TransferModule


def test_heads_take_the_backbone_width_and_the_number_of_outputs() -> None:
    model = TransferModule(TinyBackbone(width=5), num_classes=4, head=MLPHead)
    assert model.head[0].in_features == 10 and model.head[-1].out_features == 4
    binary = TransferModule(TinyBackbone(), num_classes=2, task="binary")
    assert binary.head[-1].out_features == 1  # one logit for the positive class
    assert isinstance(LinearHead(8, 3, dropout=0.5)[0], nn.Dropout) and len(LinearHead(8, 3)) == 1
    assert MLPHead(8, 3, hidden=16)(torch.randn(2, 8)).shape == (2, 3)


def test_mlp_head_refuses_a_non_positive_width() -> None:
    with pytest.raises(ValueError, match=r"model\.head\.hidden must be positive, got 0"):
        MLPHead(8, 3, hidden=0)
