"""The declared protocols: TransferModule follows each, and every user of one refuses a module that does not,
with a message naming what it needs (instead of an AttributeError deep inside a hook)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import ImageDataModule, LRFinder, ProgressiveUnfreezing, TransferModule
from transfer_lit.data.feature_cache import resolve_cache_features
from transfer_lit.freezing import FreezingHooks
from transfer_lit.protocols import (
    Classifier,
    FeatureCacheable,
    Freezable,
    HasPreprocessing,
    LRScalable,
    Unfreezable,
)


class _Plain(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("protocol", [Classifier, FeatureCacheable, Freezable, HasPreprocessing, LRScalable,
                                      Unfreezable])
def test_transfer_module_follows_every_protocol(protocol: type) -> None:
    assert isinstance(TransferModule(TinyBackbone(), num_classes=3), protocol)
    assert not isinstance(_Plain(), protocol)


def _fit(module: LightningModule, callback: object, root: Path) -> None:
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                      default_root_dir=root)
    trainer.fit(module, DataLoader(data, batch_size=4))


@pytest.mark.parametrize(
    ("callback", "needs"),
    [
        (ProgressiveUnfreezing(every_n_epochs=1), "Unfreezable"),
        (LRFinder(num_steps=3), "LRScalable"),
    ],
)
def test_callbacks_refuse_a_module_without_their_protocol(callback: object, needs: str, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=rf"needs a transfer_lit\.TransferModule \(the {needs} protocol.*got _Plain"):
        _fit(_Plain(), callback, tmp_path)


def test_freezing_hooks_refuse_a_module_without_their_protocol() -> None:
    with pytest.raises(TypeError, match=r"needs a transfer_lit\.TransferModule \(the Freezable protocol\), got _Plain"):
        FreezingHooks(_Plain())  # type: ignore[arg-type]


def test_the_feature_cache_and_the_data_module_refuse_a_module_without_their_protocol(image_folder: Path) -> None:
    assert not resolve_cache_features("auto", _Plain(), "val", "none")
    with pytest.raises(ValueError, match=r"cache_features=true cannot be honoured: _Plain is not a transfer_lit"):
        resolve_cache_features(True, _Plain(), "train", "none")
    data = ImageDataModule(root=str(image_folder), num_workers=0)
    with pytest.raises(RuntimeError, match=r"needs `preprocessing` when it is not used with a TransferModule"):
        data.resolved_preprocessing()
