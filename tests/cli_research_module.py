"""A research subclass of TransferModule, selected from the CLI with ``--model cli_research_module.FocalTransferModule``
(tests/test_cli.py): an extra constructor argument and an overridden hook."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from transfer_lit import TransferModule


class FocalTransferModule(TransferModule):
    """Focal loss (Lin et al. 2017) instead of cross-entropy.

    Args:
        gamma: focusing parameter (0 = cross-entropy).
        **kwargs: everything ``TransferModule`` takes.
    """

    calls = 0

    def __init__(self, *args: Any, gamma: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return (-(1 - log_p.exp()) ** self.gamma * log_p).mean()
