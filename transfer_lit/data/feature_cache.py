"""Feature caching for linear probes: run a frozen backbone over a split once, then train the head on the features.

A linear probe spends nearly all its time decoding images and running the backbone, whose output never
changes while the backbone is frozen and the transform is deterministic. :class:`FeatureCache` computes
the pooled features of a split once (through the module's own ``features``) and :class:`FeatureDataset`
serves them as :class:`~transfer_lit.protocols.CachedFeatures` batches, which the module's
``batch_logits`` sends straight to its head. Which modules qualify is theirs to say
(:class:`~transfer_lit.protocols.FeatureCacheable`): ``TransferModule`` refuses when it is not a linear
probe, when the strategy shards the backbone, or when a subclass overrides ``forward`` or
``batch_logits`` (cached features would bypass them).

An entry is keyed by everything the features depend on (:func:`cache_key`): the module and backbone classes, a hash of
its state dict (weights *and* BatchNorm statistics), the preprocessing, the trainer precision and a
fingerprint of the image files (path, size, modification time). Changing any of them is a miss. Labels
are not part of the key: they are read from the current split each time, so relabelling needs no
re-extraction and can never be stale.

Distributed runs: every rank extracts an interleaved shard (``rank::world_size``) and the shards are
all-gathered, so each rank ends with the whole split (the sampler Lightning injects then shards the
feature batches as usual). Whether the cache hit is decided on all ranks together, so they never
disagree. With ``directory`` set, local rank 0 writes the entry atomically; a shared folder is then a
hit for every rank of a later run.

Features are float32 on the CPU: ``images x num_features x 4`` bytes per split (ImageNet-1k train with a
ResNet-50: 10 GB), moved to the device batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer_lit.data.decode import Sample
from transfer_lit.preprocessing import Preprocessing
from transfer_lit.protocols import CachedFeatures, FeatureCacheable

CacheFeatures = bool | Literal["auto"]
_FORMAT_VERSION = 2


def resolve_cache_features(setting: CacheFeatures, module: Any, split: str, augment: str) -> bool:
    """Whether ``split`` is served from the feature cache.

    ``auto`` caches only what is already deterministic: the validation split, in linear-probe mode.
    ``True`` also caches the training split, which is then transformed like validation (resize +
    centre crop, no random crop or flip). ``False`` never caches. Test and predict always read images.

    Args:
        setting: the ``data.cache_features`` value.
        module: the LightningModule the trainer runs (None without a trainer: images are read as usual).
        split: ``train``, ``val``, ``test`` or ``predict``.
        augment: the ``data.augment`` value.
    """
    if setting not in (True, False, "auto"):
        raise ValueError(f"data.cache_features must be true, false or 'auto', got {setting!r}")
    if setting is False or split not in ("train", "val") or module is None:  # no module: nothing to extract with
        return False
    if not isinstance(module, FeatureCacheable):
        refusal: str | None = f"{type(module).__name__} is not a transfer_lit.TransferModule (FeatureCacheable)"
    else:
        refusal = module.feature_cache_refusal()
    if refusal is not None:
        if setting is True:
            raise ValueError(f"data.cache_features=true cannot be honoured: {refusal}; use cache_features 'auto' "
                             f"(cache only where it is exact) or false")
        if isinstance(module, FeatureCacheable) and module.mode == "linear_probe" and split == "val":  # expected it
            rank_zero_warn(f"transfer_lit feature cache: off ({refusal}); validation reads images every epoch")
        return False
    if setting is True and augment != "none":
        raise ValueError(f"data.cache_features=true trains on fixed features, so data.augment must be 'none', "
                         f"got {augment!r}")
    return split == "val" or setting is True


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of the sorted set of files with their sizes and modification times (labels excluded, see module doc)."""
    digest = hashlib.sha256()
    for path in sorted({p for p, _ in samples}):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _qualname(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def cache_key(module: FeatureCacheable, preprocessing: Preprocessing, samples: Sequence[Sample], precision: str,
              reader: str = "full", files: str | None = None) -> str:
    """The identity of a split's features: module and backbone classes, weights, preprocessing, precision, files and
    how they are decoded (``reader``: ``full`` or a reduced-size decode). ``files``: the inputs' fingerprint when
    the samples are not files (texts), else :func:`dataset_fingerprint`."""
    backbone = module.backbone
    parts = {
        "version": _FORMAT_VERSION,
        "module": _qualname(module),  # a subclass may compute features its own way
        "backbone": _qualname(backbone),
        "weights": weights_fingerprint(backbone),
        "preprocessing": preprocessing.to_dict(),
        "precision": precision,
        "files": files if files is not None else dataset_fingerprint(samples),
        "reader": reader,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class FeatureEntry:
    """The features of one split: row ``i`` of ``features`` belongs to ``paths[i]`` (unreadable files left out)."""

    paths: list[str]
    features: torch.Tensor


class FeatureDataset(Dataset):
    """Cached features in the order of ``samples``, with the labels of ``samples``.

    Args:
        entry: the split's cached features.
        samples: ``(path, label)`` pairs; paths missing from ``entry`` (unreadable images) are left out.
    """

    def __init__(self, entry: FeatureEntry, samples: Sequence[Sample]) -> None:
        rows = {p: i for i, p in enumerate(entry.paths)}
        kept = [(rows[p], label) for p, label in samples if p in rows]
        self.features = entry.features[[r for r, _ in kept]]
        self.targets = torch.tensor([label for _, label in kept], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> CachedFeatures:
        return CachedFeatures(self.features[index], self.targets[index])


class _Indexed(Dataset):
    """Yields ``(inputs, index)`` for the given indices of a dataset (``None`` for unreadable images)."""

    def __init__(self, images: Dataset, indices: Sequence[int]) -> None:
        self.images, self.indices = images, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        item = self.images[self.indices[i]]
        return None if item is None else (item[0], self.indices[i])


class FeatureCache:
    """Features of data splits, in memory and optionally in ``directory`` (one ``.pt`` file per key).

    Args:
        directory: folder for entries shared across runs; ``None`` keeps them in memory only.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.memory: dict[str, FeatureEntry] = {}
        self.hits = 0
        self.misses = 0
        self.extraction_seconds = 0.0

    def _file(self, key: str) -> Path | None:
        return self.directory / f"features-{key[:32]}.pt" if self.directory is not None else None

    def lookup(self, key: str) -> FeatureEntry | None:
        """The entry of ``key`` from memory, else from disk, else None."""
        if key in self.memory:
            return self.memory[key]
        file = self._file(key)
        if file is None or not file.is_file():
            return None
        state = torch.load(file, map_location="cpu", weights_only=True)
        if state.get("key") != key:
            return None
        self.memory[key] = FeatureEntry(list(state["paths"]), state["features"])
        return self.memory[key]

    def store(self, key: str, entry: FeatureEntry, write: bool = True) -> None:
        """Keep ``entry`` in memory and, when ``write`` and a directory is set, on disk (atomic rename)."""
        self.memory[key] = entry
        file = self._file(key)
        if file is None or not write:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": key, "paths": entry.paths, "features": entry.features}, tmp)
        os.replace(tmp, file)

    def features(self, trainer: Any, module: FeatureCacheable, images: Dataset, samples: Sequence[Sample],
                 preprocessing: Preprocessing, loader_kwargs: dict[str, Any], split: str,
                 reader: str = "full", files: str | None = None) -> FeatureEntry:
        """The entry of ``samples`` (decoded by ``images``, same order), extracting it on a miss.

        Args:
            trainer: the running Trainer (device, precision, distributed collectives).
            module: the module whose (frozen) ``features`` are cached, already on the trainer's device.
            images: dataset yielding ``(image tensor, label)`` or ``None`` for ``samples[i]``.
            samples: the split's ``(path, label)`` pairs.
            preprocessing: what ``images`` applies (part of the key).
            loader_kwargs: ``DataLoader`` arguments for extraction (batch size, workers, collate).
            split: name used in the log line.
            reader: how ``images`` decodes files (part of the key).
            files: fingerprint of inputs that are not files (texts; part of the key).
        """
        strategy = trainer.strategy
        key = cache_key(module, preprocessing, samples, str(trainer.precision), reader, files)
        entry = self.lookup(key)
        if strategy.reduce_boolean_decision(entry is not None, all=True):
            assert entry is not None
            self.hits += 1
            rank_zero_info(f"transfer_lit feature cache: {split} hit ({len(entry.paths)} inputs, key {key[:12]})")
            return entry
        self.misses += 1
        start = time.perf_counter()
        entry = extract_features(trainer, module, images, samples, loader_kwargs)
        self.extraction_seconds += time.perf_counter() - start
        self.store(key, entry, write=trainer.local_rank == 0)
        rank_zero_info(f"transfer_lit feature cache: {split} miss, extracted {len(entry.paths)} inputs in "
                       f"{time.perf_counter() - start:.1f}s (key {key[:12]})")
        return entry


@torch.no_grad()
def extract_features(trainer: Any, module: FeatureCacheable, images: Dataset, samples: Sequence[Sample],
                     loader_kwargs: dict[str, Any]) -> FeatureEntry:
    """Pooled float32 features (``module.features``) of every readable sample, each rank computing the shard
    ``rank::world_size``."""
    strategy, precision = trainer.strategy, trainer.precision_plugin
    rank, world = trainer.global_rank, trainer.world_size
    backbone = module.backbone
    device = next(backbone.parameters()).device
    shard = list(range(rank, len(samples), world))
    rows = -(-len(samples) // world)  # every rank gathers the same number of rows
    features = torch.zeros(rows, backbone.num_features, device=device)
    valid = torch.zeros(rows, dtype=torch.bool, device=device)
    was_training = backbone.training
    backbone.eval()
    try:
        # Its own generator: extracting must not consume the global RNG, so the run's data order is unchanged.
        loader = DataLoader(_Indexed(images, shard), shuffle=False, generator=torch.Generator(), **loader_kwargs)
        for batch in loader:
            if batch is None:
                continue
            x, index = batch
            with precision.forward_context():
                out = module.features(precision.convert_input(move_data_to_device(x, device)))
            local = (index.to(device) - rank) // world
            features[local] = out.float()
            valid[local] = True
    finally:
        backbone.train(was_training)
    if world > 1:  # (world, rows, F) -> sample order r + j * world
        features = strategy.all_gather(features).transpose(0, 1).reshape(-1, features.shape[-1])
        valid = strategy.all_gather(valid.to(torch.uint8)).transpose(0, 1).reshape(-1).bool()  # gloo has no bool
    features, valid = features[: len(samples)].cpu(), valid[: len(samples)].cpu()
    paths = [p for (p, _), ok in zip(samples, valid.tolist(), strict=True) if ok]
    return FeatureEntry(paths, features[valid].contiguous())
