"""Training data that a resume from a mid-epoch checkpoint continues exactly.

A ``DataLoader(shuffle=True)`` draws each epoch's order (and its workers' seeds) from the global RNG when the epoch
starts, and random augmentations from the RNG of whichever process decodes the image. Resumed from a checkpoint saved
mid-epoch (``interrupted.ckpt``, ``every_n_train_steps``), Lightning runs the rest of the epoch's batches, but drawn
from a new shuffle, with other crops: some images are seen twice that epoch, others not at all. Here instead:

* :class:`EpochShuffle` orders an epoch from ``(seed, epoch)`` alone (:class:`DistributedSampler`'s permutation,
  sharded over the ranks it is told, so Lightning injects no sampler of its own), and can pair every index with
  :func:`sample_seed`, a seed of that sample's own, which :class:`~transfer_lit.data.decode.ImageDataset` runs its
  random transform under: the same crops with any number of loader workers, and after a resume;
* :class:`ResumableLoader` is a ``DataLoader`` with Lightning's ``state_dict`` / ``load_state_dict`` protocol:
  a checkpoint records the epoch and how many of its batches were trained; Lightning hands that back on resume,
  and the first iteration of that epoch skips them.

Together with the RNG states :class:`~transfer_lit.callbacks.FaultTolerance` keeps in checkpoints, a run resumed
mid-epoch ends with the weights of the run that was never stopped, bit for bit. A sample's transform runs under its
seed in torch, Python's ``random`` and NumPy's global RNG alike (:func:`seeded`), so augmentations of a user's own
that draw from any of the three repeat too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index``'s augmentation in ``epoch`` (a fixed mix of the three numbers)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch) & _MASK
    return ((mixed * 0xBF58476D1CE4E5B9 + index) * 0x94D049BB133111EB) & _MASK


def _seed_all(seed: int) -> None:
    # torch's CPU generator only: torch.manual_seed would also reseed every CUDA device (and costs 100x more).
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)  # NumPy's legacy seed takes 32 bits


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with torch's CPU RNG, Python's ``random`` and NumPy's global RNG seeded by ``seed``, and give the
    caller's states back afterwards (a no-op for ``None``): the main process's streams (dropout, the next sample) are
    not moved by a sample decoded in it. A loader worker's streams serve only its samples, each seeded anew: there
    the states are not saved (once per image, that would cost more than the seeding)."""
    if seed is None:
        yield
        return
    if get_worker_info() is not None:
        _seed_all(seed)
        yield
        return
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        _seed_all(seed)
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class EpochShuffle(DistributedSampler):
    """Indices ``0..size-1`` shuffled per epoch from ``seed + epoch``, sharded over ``num_replicas`` ranks.

    The order is :class:`DistributedSampler`'s (padded from the start to a multiple of ``num_replicas``, rank ``r``
    taking every ``num_replicas``-th index from ``r``). Lightning calls :meth:`set_epoch` at the start of every epoch.

    Args:
        size: number of samples.
        num_replicas: DDP world size.
        rank: this process's global rank.
        seed: base seed of the order and of the sample seeds.
        sample_seeds: yield ``(index, sample_seed(seed, epoch, index))`` pairs instead of plain indices, for a
            dataset that seeds each sample's augmentation (:class:`~transfer_lit.data.decode.ImageDataset`).
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 sample_seeds: bool = False) -> None:
        # Not DistributedSampler.__init__: it needs a process group, and this sampler is told its rank.
        self.dataset = range(size)  # type: ignore[assignment]  # DistributedSampler reads its length
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.shuffle, self.drop_last, self.sample_seeds = True, False, sample_seeds
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, samples: int) -> None:
        """Skip the first ``samples`` indices of this rank when it next iterates ``epoch`` (once)."""
        self._resume = (epoch, samples)

    def order(self) -> list[int]:
        """This rank's indices of the current epoch, in order (a subclass orders them otherwise)."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[Any]:
        indices = self.order()
        if self._resume is not None:
            epoch, samples = self._resume
            self._resume = None
            if epoch == self.epoch:
                indices = indices[samples:]
        if self.sample_seeds:
            return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])
        return iter(indices)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over an :class:`EpochShuffle` whose checkpointed state is where the epoch stands.

    Args:
        dataset: the training samples.
        sampler: their order.
        trained_batches: the number of this epoch's batches trained so far, asked when a checkpoint is saved
            (:meth:`~transfer_lit.data.base.LabelledDataModule.trained_batches`).
        **kwargs: any other ``DataLoader`` argument (``batch_size``, ``drop_last``, ``num_workers``, ...).
    """

    sampler: EpochShuffle

    def __init__(self, dataset: Dataset, sampler: EpochShuffle, trained_batches: Callable[[], int],
                 **kwargs: Any) -> None:
        # Its own generator for the workers' base seed: starting an epoch's workers (or a resumed run's) takes no
        # number from the global RNG, whose stream (dropout) goes on as in a run never stopped.
        super().__init__(dataset, sampler=sampler, **{"generator": torch.Generator(), **kwargs})
        self.trained_batches = trained_batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.trained_batches()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume_at(state_dict["epoch"], state_dict["batches"] * (self.batch_size or 1))
