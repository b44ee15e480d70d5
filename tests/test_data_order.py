"""The training order a mid-epoch resume continues: per-epoch shuffles from the seed alone, sharded over ranks,
skipped to where a checkpoint stood; per-sample augmentation seeds (:mod:`transfer_lit.data.order`)."""

from __future__ import annotations

import random

import numpy as np
import torch

from transfer_lit.data.order import EpochShuffle, ResumableLoader, sample_seed, seeded
from transfer_lit.data.text_batches import LengthBucketSampler


def test_the_order_depends_on_seed_and_epoch_only_and_ranks_share_it_out() -> None:
    one = EpochShuffle(10, seed=3)
    assert sorted(one) == list(range(10)) and list(one) == list(EpochShuffle(10, seed=3))
    epoch_0 = list(one)
    one.set_epoch(1)
    assert list(one) != epoch_0 and sorted(one) == list(range(10))
    assert list(EpochShuffle(10, seed=4)) != epoch_0
    ranks = [list(EpochShuffle(10, num_replicas=3, rank=r, seed=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4] and {i for r in ranks for i in r} == set(range(10))  # 2 padded


def test_resume_at_skips_the_trained_samples_of_that_epoch_once() -> None:
    sampler = EpochShuffle(12, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume_at(epoch=2, samples=5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # once only
    sampler.resume_at(epoch=1, samples=5)  # another epoch's position: nothing skipped
    assert list(sampler) == full


def test_sample_seeds_follow_the_sample_not_its_rank_or_position() -> None:
    whole = dict(EpochShuffle(8, seed=1, sample_seeds=True))
    shard = dict(EpochShuffle(8, num_replicas=2, rank=1, seed=1, sample_seeds=True))
    assert all(whole[i] == s for i, s in shard.items())
    assert len(set(whole.values())) == 8 and whole[0] == sample_seed(1, 0, 0) != sample_seed(1, 1, 0)


def _draw() -> tuple[float, float, float]:
    return torch.rand(1).item(), random.random(), float(np.random.rand())


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_seeded_gives_the_callers_rng_back() -> None:
    """torch's, Python's and NumPy's streams alike (with a seed over NumPy's 32 bits)."""
    _seed_all(0)
    expected = _draw()
    _seed_all(0)
    with seeded(sample_seed(1, 2, 3)):
        inside = _draw()
    assert _draw() == expected  # the caller's streams did not move
    with seeded(sample_seed(1, 2, 3)):
        assert _draw() == inside
    with seeded(sample_seed(1, 2, 4)):
        assert all(a != b for a, b in zip(_draw(), inside, strict=True))


def test_the_loader_state_is_the_epoch_and_its_trained_batches() -> None:
    sampler = EpochShuffle(10, seed=0)
    loader = ResumableLoader(list(range(10)), sampler, trained_batches=lambda: 2, batch_size=3)
    sampler.set_epoch(4)
    assert loader.state_dict() == {"epoch": 4, "batches": 2}
    fresh = ResumableLoader(list(range(10)), EpochShuffle(10, seed=0), trained_batches=lambda: 0, batch_size=3)
    fresh.load_state_dict(loader.state_dict())
    fresh.sampler.set_epoch(4)
    assert torch.cat(list(fresh)).tolist() == list(sampler)[6:]  # batches 2 and 3 of the 4 the epoch has


def test_length_buckets_resume_too() -> None:
    lengths = [i % 7 + 1 for i in range(40)]
    sampler = LengthBucketSampler(lengths, batch_size=4, seed=2)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.resume_at(1, 8)
    assert list(sampler) == full[8:]
