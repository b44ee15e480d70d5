"""Every overridable hook of TransferModule (README "Hooks for research code"): a subclass overriding it changes what a
real ``fit`` does. Each test compares against the base class on the same data and seed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest
import torch
from conftest import MLPBackbone
from lightning.pytorch import Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import FreezingStrategy, GateOnlyFreezing, TransferModule

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(24, 12, generator=g), torch.randint(0, 3, (24,), generator=g)),
                      batch_size=8)


def _fit(cls: type[TransferModule], **kwargs: Any) -> tuple[TransferModule, Trainer]:
    seed_everything(0)
    model = cls(MLPBackbone(), num_classes=3, **kwargs)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, _data(), _data())
    return model, trainer


class ConstantLoss(TransferModule):
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits.sum() * 0 + 7.0


class UniformProbabilities(TransferModule):
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, 1 / logits.shape[1])


class ZeroFeatures(TransferModule):
    def features(self, inputs: Any) -> torch.Tensor:
        return super().features(inputs) * 0


class ZeroLogits(TransferModule):
    def batch_logits(self, batch: Any) -> torch.Tensor:
        return super().batch_logits(batch) * 0


class ExtraMetric(TransferModule):
    def shared_step(self, batch: Any, stage: str) -> torch.Tensor | None:
        loss = super().shared_step(batch, stage)
        self.log(f"{stage}_extra", 1.0, batch_size=len(batch[1]))
        return loss


class PlainSGD(TransferModule):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NeverFreezeTheStem(TransferModule):
    def set_frozen_blocks(self, blocks: Iterable[str]) -> None:
        super().set_frozen_blocks([b for b in blocks if b != "stem"])


class GateOnly(TransferModule):
    def configure_freezing(self) -> FreezingStrategy:
        return GateOnlyFreezing()


class TwoLayerHead(nn.Sequential):
    def __init__(self, in_features: int, num_outputs: int) -> None:
        super().__init__(nn.Linear(in_features, 5), nn.ReLU(), nn.Linear(5, num_outputs))


def test_loss() -> None:
    _, trainer = _fit(ConstantLoss)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(7.0)
    _, base = _fit(TransferModule)
    assert float(base.callback_metrics["val_loss"]) != pytest.approx(7.0)


def test_probabilities() -> None:
    _, trainer = _fit(UniformProbabilities)
    assert float(trainer.callback_metrics["val_auroc"]) == pytest.approx(0.5)  # no ranking left at all


def test_features_and_batch_logits() -> None:
    for cls in (ZeroFeatures, ZeroLogits):
        model, _ = _fit(cls)
        x, _ = next(iter(_data()))
        logits = model.batch_logits((x, None))
        assert torch.allclose(logits, logits[:1].expand_as(logits))  # every input gets the same logits
    _, base = _fit(ZeroLogits)
    assert float(base.callback_metrics["val_loss"]) == pytest.approx(math.log(3), abs=1e-5)


def test_shared_step() -> None:
    _, trainer = _fit(ExtraMetric)
    assert {"train_extra", "val_extra"} <= set(trainer.callback_metrics)


def test_configure_optimizers() -> None:
    _, trainer = _fit(PlainSGD)
    assert type(trainer.optimizers[0]) is torch.optim.SGD and len(trainer.optimizers[0].param_groups) == 1
    _, base = _fit(TransferModule)
    assert {g["name"] for g in base.optimizers[0].param_groups} >= {"head", "backbone.stem", "backbone.block2"}


def test_set_frozen_blocks() -> None:
    model, _ = _fit(NeverFreezeTheStem, mode="progressive")
    assert model.frozen_blocks == {"block1", "block2"}
    assert all(p.requires_grad for p in model.backbone.stem.parameters())


def test_configure_freezing() -> None:
    model, _ = _fit(GateOnly, mode="progressive")
    assert isinstance(model.freezing, GateOnlyFreezing)
    assert all(p.requires_grad for p in model.backbone.parameters())  # gate-only: frozen by the LR gate alone
    seed_everything(0)  # the gate kept every frozen block still: the backbone is its initialization
    fresh = GateOnly(MLPBackbone(), num_classes=3, mode="progressive")
    for name, p in model.backbone.named_parameters():
        torch.testing.assert_close(p, dict(fresh.backbone.named_parameters())[name])


def test_head_factory() -> None:
    model, _ = _fit(TransferModule, head=TwoLayerHead)
    assert isinstance(model.head, TwoLayerHead) and model.head[0].in_features == model.backbone.num_features
    assert "head" in {g["name"] for g in model.trainer.optimizers[0].param_groups}
