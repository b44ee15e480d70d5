"""Token batches: tokenized texts, dynamic padding, and length-bucketed batches that stay correct under DDP.

Padding every batch to ``max_length`` spends most of a text model's time on padding tokens.
:class:`TextCollator` pads each batch to its own longest text, and :class:`LengthBucketSampler` makes
batches of texts of similar length (sorted within large random chunks, then the batches shuffled), so
there is little padding left. The sampler shards its batches over the DDP ranks itself (every rank gets the
same number, of similar lengths at the same step); it subclasses ``DistributedSampler`` so that Lightning
does not wrap it in one of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from transfer_lit.data.order import EpochShuffle

Encoded = dict[str, list[int]]


class TokenizedTexts(Dataset):
    """``(encoded text, target)`` pairs; texts are tokenized up front (``encoded``) or on access (``tokenize``).

    Args:
        targets: one per text: class indices, or (predict) the texts themselves.
        encoded: token ids of every text, already truncated (up-front tokenization).
        texts: the raw texts, tokenized in ``__getitem__`` (in the loader workers) when ``encoded`` is None.
        tokenize: ``text -> encoded`` for on-access tokenization.
    """

    def __init__(self, targets: Sequence[Any], encoded: Sequence[Encoded] | None = None,
                 texts: Sequence[str] | None = None, tokenize: Any = None) -> None:
        if encoded is None and (texts is None or tokenize is None):
            raise ValueError("TokenizedTexts needs `encoded`, or `texts` and `tokenize`")
        self.targets, self.encoded, self.texts, self.tokenize = list(targets), encoded, texts, tokenize

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Encoded, Any]:
        if self.encoded is not None:
            return self.encoded[index], self.targets[index]
        assert self.texts is not None
        return self.tokenize(self.texts[index]), self.targets[index]

    def lengths(self) -> list[int]:
        """Token counts (up front), else character counts (a proxy good enough for bucketing)."""
        if self.encoded is not None:
            return [len(e["input_ids"]) for e in self.encoded]
        assert self.texts is not None
        return [len(t) for t in self.texts]


class TextCollator:
    """Pads a list of ``(encoded, target)`` to one batch ``({input_ids, attention_mask[, token_type_ids]}, targets)``.

    Args:
        pad_id: the tokenizer's padding token id.
        input_names: the model inputs to build (the tokenizer's ``model_input_names``).
        pad_to: ``None`` pads to the batch's longest text; an integer pads every batch to that length.
    """

    def __init__(self, pad_id: int, input_names: Sequence[str], pad_to: int | None = None) -> None:
        self.pad_id, self.input_names, self.pad_to = pad_id, list(input_names), pad_to

    def __call__(self, items: list[tuple[Encoded, Any]]) -> tuple[dict[str, torch.Tensor], Any]:
        longest = max(len(e["input_ids"]) for e, _ in items)
        width = self.pad_to if self.pad_to is not None else longest
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (e, _) in enumerate(items):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            batch["token_type_ids"] = torch.zeros_like(ids)
        targets = [t for _, t in items]
        if all(isinstance(t, int) for t in targets):
            return batch, torch.tensor(targets, dtype=torch.long)
        return batch, targets


class LengthBucketSampler(EpochShuffle):
    """Indices in batches of similar length, shuffled per epoch, sharded over ``num_replicas`` ranks.

    Each epoch: a seeded permutation is cut into chunks of ``bucket_batches`` global batches
    (``batch_size x num_replicas`` texts), each chunk is sorted by length and cut into global batches, the
    global batches are shuffled, and rank ``r`` takes the ``r``-th ``batch_size`` of each. Batches of a
    ``DataLoader(batch_size=batch_size, sampler=...)`` are then exactly these.

    Args:
        lengths: length of every text (tokens or characters).
        batch_size: texts per batch per rank.
        num_replicas: DDP world size.
        rank: this process's global rank.
        seed: base seed (the epoch is added, through ``set_epoch``).
        bucket_batches: global batches per sorted chunk: larger = less padding, less randomness.
        drop_last: drop the last incomplete global batch (else it is completed with texts from the start).
        shuffle: ``False`` keeps the input order (still sharded).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 bucket_batches: int = 50, drop_last: bool = False, shuffle: bool = True) -> None:
        super().__init__(len(lengths), num_replicas, rank, seed)
        self.lengths, self.batch_size = list(lengths), batch_size
        self.bucket_batches, self.drop_last, self.shuffle = bucket_batches, drop_last, shuffle
        global_batch = batch_size * num_replicas
        n = len(self.lengths)
        self.num_global = n // global_batch if drop_last else math.ceil(n / global_batch)
        self.num_samples = self.num_global * batch_size
        self.total_size = self.num_samples * num_replicas

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (every rank computes the same list)."""
        n, global_batch = len(self.lengths), self.batch_size * self.num_replicas
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.total_size > n:  # complete the last batch as DistributedSampler does, repeating from the start
            order += (order * math.ceil(self.total_size / n))[: self.total_size - n]
        order = order[: self.total_size]
        chunk = global_batch * self.bucket_batches
        batches = []
        for start in range(0, len(order), chunk):
            piece = order[start:start + chunk]
            if self.shuffle:
                piece = sorted(piece, key=self.lengths.__getitem__)
            batches += [piece[i:i + global_batch] for i in range(0, len(piece), global_batch)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def order(self) -> list[int]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [index for batch in self.global_batches() for index in batch[lo:hi]]

    def __len__(self) -> int:
        return self.num_samples
