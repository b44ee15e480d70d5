"""Token batches (transfer_lit.data.text_batches): dynamic padding, and length buckets that shard over DDP ranks."""

from __future__ import annotations

import random

import pytest
import torch

from transfer_lit.data.text_batches import LengthBucketSampler, TextCollator, TokenizedTexts


def _lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def test_the_collator_pads_to_the_longest_or_to_max_length() -> None:
    items = [({"input_ids": [2, 5, 3]}, 0), ({"input_ids": [2, 3]}, 1)]
    batch, target = TextCollator(0, ["input_ids", "token_type_ids", "attention_mask"])(items)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]] and target.tolist() == [0, 1]
    fixed, _ = TextCollator(0, ["input_ids", "attention_mask"], pad_to=6)(items)
    assert fixed["input_ids"].shape == (2, 6) and "token_type_ids" not in fixed
    _, texts = TextCollator(0, ["input_ids"])([({"input_ids": [2]}, "a text")])
    assert texts == ["a text"]


def test_every_text_once_per_epoch_in_batches_of_similar_length() -> None:
    lengths = _lengths()
    sampler = LengthBucketSampler(lengths, batch_size=20, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    batches = [order[i:i + 20] for i in range(0, 1000, 20)]
    bucketed = sum(20 * max(lengths[i] for i in b) for b in batches)
    shuffled = random.Random(0).sample(range(1000), 1000)
    plain = sum(20 * max(lengths[i] for i in shuffled[k:k + 20]) for k in range(0, 1000, 20))
    assert bucketed < 0.6 * plain  # tokens including padding: far fewer than random batches


def test_the_order_is_seeded_and_changes_with_the_epoch() -> None:
    a, b = LengthBucketSampler(_lengths(), 16, seed=1), LengthBucketSampler(_lengths(), 16, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_equal_shards_of_every_global_batch(drop_last: bool) -> None:
    lengths = _lengths(1003)
    ranks = [LengthBucketSampler(lengths, 8, num_replicas=3, rank=r, seed=0, drop_last=drop_last) for r in range(3)]
    orders = [list(s) for s in ranks]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == len(ranks[0])
    if drop_last:
        seen = [i for o in orders for i in o]
        assert len(seen) == len(set(seen)) == 1003 // 24 * 24
    else:
        assert set().union(*map(set, orders)) == set(range(1003))
    for k in range(0, len(orders[0]), 8):  # step k: every rank's batch comes from the same sorted chunk
        spread = [max(lengths[i] for i in o[k:k + 8]) for o in orders]
        assert max(spread) - min(spread) <= 40


def test_tokenized_texts_up_front_or_on_access_agree() -> None:
    def tokenize(text: str) -> dict[str, list[int]]:
        return {"input_ids": [len(w) for w in text.split()]}

    texts = ["a bb ccc", "dddd"]
    upfront = TokenizedTexts([0, 1], encoded=[tokenize(t) for t in texts])
    lazy = TokenizedTexts([0, 1], texts=texts, tokenize=tokenize)
    assert [upfront[i] for i in range(2)] == [lazy[i] for i in range(2)]
    assert upfront.lengths() == [3, 1] and lazy.lengths() == [8, 4]
    with pytest.raises(ValueError, match="needs `encoded`"):
        TokenizedTexts([0])
    assert isinstance(TextCollator(0, ["input_ids"])([upfront[0]])[0]["input_ids"], torch.Tensor)
