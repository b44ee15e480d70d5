"""What every labelled data module shares: named classes, splits of ``(input, class index)`` samples, one loader per
stage. :class:`~transfer_lit.ImageDataModule` and :class:`~transfer_lit.TextDataModule` fill in ``_loader``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader


class LabelledDataModule(LightningDataModule):
    """Base of the data modules: ``splits`` maps ``train`` / ``val`` / ``test`` to ``(input, class index)`` samples
    (an image path, or a text), ``class_names`` names the indices (linked to the model by the CLI)."""

    splits: dict[str, list[tuple[Any, int]]]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes found in the training data (linked to ``model.num_classes`` by the CLI)."""
        return len(self.class_names)

    def class_counts(self, split: str = "train") -> dict[str, int]:
        """Samples per class name in ``split``."""
        counts = Counter(label for _, label in self.splits.get(split, []))
        return {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}

    def _loader(self, split: str, train: bool) -> DataLoader:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
