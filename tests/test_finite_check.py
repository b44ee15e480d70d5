"""FiniteCheck (transfer_lit.finite_check) as a module-attached callback: bound to its module, so a reused
Trainer neither checks another module nor re-attaches it (the deferred logic is in test_sync_free.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import NonFiniteLossError, TransferModule
from transfer_lit.evaluation.hooks import EvaluationHooks
from transfer_lit.finite_check import FiniteCheck
from transfer_lit.freezing import FreezingHooks


class _NaNLoss(TransferModule):
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().loss(logits, target) * float("nan")


class _Plain(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3 * 16 * 16, 3)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)))
    return DataLoader(data, batch_size=4)


def test_a_reused_trainer_checks_only_the_module_that_attached_it(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    first = TransferModule(TinyBackbone(), num_classes=3)
    trainer.fit(first, _loader())
    mine = [c for c in trainer.callbacks if getattr(c, "owner", None) is first]
    assert {type(c) for c in mine} == {FreezingHooks, EvaluationHooks, FiniteCheck}
    caplog.set_level(logging.INFO)
    trainer.validate(first, _loader(), verbose=False)  # the same module again: nothing re-attached
    assert "will override existing callbacks" not in caplog.text
    assert [c for c in trainer.callbacks if getattr(c, "owner", None) is first] == mine

    unchecked = _NaNLoss(TinyBackbone(), num_classes=3, check_finite=False)
    trainer.fit(unchecked, _loader())  # the first module's check leaves it alone: NaN allowed, as asked
    trainer.fit(_Plain(), _loader())  # and a plain module trains under the old callbacks without a TypeError
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at global step 0"):
        Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path).fit(
            _NaNLoss(TinyBackbone(), num_classes=3), _loader())


def test_the_batch_is_not_kept_after_the_check() -> None:
    model = TransferModule(TinyBackbone(), num_classes=3)
    check = FiniteCheck(model)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    check.on_train_batch_start(trainer, model, (torch.ones(2, 3), torch.zeros(2)), 0)
    check.on_before_backward(trainer, model, torch.tensor(1.0))
    assert check._inputs is None
