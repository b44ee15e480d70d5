"""What every labelled data module shares: named classes, splits of ``(input, class index)`` samples, one loader per
stage. :class:`~transfer_lit.ImageDataModule` and :class:`~transfer_lit.TextDataModule` fill in ``_loader``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from transfer_lit.data.held_out import check_held_out


class LabelledDataModule(LightningDataModule):
    """Base of the data modules: ``splits`` maps ``train`` / ``val`` / ``test`` to ``(input, class index)`` samples
    (an image path, or a text), ``class_names`` names the indices (linked to the model by the CLI).

    ``held_out`` records the splits held out of the training data (:func:`~transfer_lit.data.held_out.split_record`):
    saved in checkpoints, and checked against the split a checkpoint is evaluated on."""

    splits: dict[str, list[tuple[Any, int]]]
    class_names: list[str]
    held_out: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"held_out": self.held_out} if self.held_out is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning calls this with the checkpoint's record after ``setup``, before the evaluation loop starts."""
        recorded = state_dict.get("held_out")
        if recorded is not None:
            command = getattr(self.trainer.state.fn, "value", None) if self.trainer is not None else None
            check_held_out(recorded, self.held_out, command)

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
