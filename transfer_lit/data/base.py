"""What every labelled data module shares: named classes, splits of ``(input, class index)`` samples, one loader per
stage. :class:`~transfer_lit.ImageDataModule` and :class:`~transfer_lit.TextDataModule` fill in ``_loader``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from transfer_lit.data.held_out import check_held_out
from transfer_lit.data.order import EpochShuffle, ResumableLoader


class LabelledDataModule(LightningDataModule):
    """Base of the data modules: ``splits`` maps ``train`` / ``val`` / ``test`` to ``(input, class index)`` samples
    (an image path, or a text), ``class_names`` names the indices (linked to the model by the CLI).

    ``held_out`` records the splits held out of the training data (:func:`~transfer_lit.data.held_out.split_record`):
    saved in checkpoints, and checked against the split a checkpoint is evaluated on."""

    splits: dict[str, list[tuple[Any, int]]]
    class_names: list[str]
    held_out: dict[str, Any] | None = None
    seed: int = 0
    batch_size: int = 1

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

    def trained_batches(self) -> int:
        """Batches of the current training epoch trained so far (0 outside ``fit``)."""
        if self.trainer is None or self.trainer.lightning_module is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]

    def world(self) -> tuple[int, int]:
        """``(world size, global rank)`` the training data are sharded over: the trainer's; ``(1, 0)`` without one,
        or with ``trainer.use_distributed_sampler: false`` (every rank reads all of it, as Lightning has it then)."""
        if self.trainer is None or not getattr(self.trainer._accelerator_connector, "use_distributed_sampler", True):
            return (1, 0)
        return self.trainer.world_size, self.trainer.global_rank

    def shuffled_loader(self, dataset: Dataset, sample_seeds: bool = False, sampler: EpochShuffle | None = None,
                        **kwargs: Any) -> ResumableLoader:
        """The training loader: ``dataset`` in a per-epoch order from ``seed`` alone (or ``sampler``'s), sharded over
        the trainer's ranks, that a resume from a mid-epoch checkpoint continues (:mod:`transfer_lit.data.order`);
        ``batch_size`` batches, the last incomplete one dropped unless it is the only one."""
        kwargs = {"batch_size": self.batch_size, "drop_last": len(dataset) > self.batch_size, **kwargs}  # type: ignore
        if sampler is None:
            sampler = EpochShuffle(len(dataset), *self.world(), self.seed, sample_seeds)  # type: ignore[arg-type]
        if self.trainer is not None:  # a resumed run's first epoch: loader workers start before Lightning's set_epoch
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)  # type: ignore[attr-defined]
        return ResumableLoader(dataset, sampler, self.trained_batches, **kwargs)

    @staticmethod
    def ordered_loader(dataset: Dataset, **kwargs: Any) -> DataLoader:
        """A validation / test / predict loader, in order, with its own generator for the workers' base seed:
        starting it takes no number from the global RNG, whose stream (dropout) then goes on alike with any
        ``num_workers`` (a loader without persistent workers draws one at every start)."""
        return DataLoader(dataset, **{"generator": torch.Generator(), **kwargs})

    def _loader(self, split: str, train: bool) -> DataLoader:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
