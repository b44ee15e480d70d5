"""ImageDataModule: labelled image folders or CSV files, with the checkpoint's own transforms.

Layouts accepted:

* ``root/train/<class>/*.jpg``, ``root/val/<class>/...`` and optionally ``root/test/<class>/...``;
* ``root/<class>/*.jpg`` (no ``train/``): a seeded, stratified ``val_fraction`` is held out;
* CSV files with a header and columns ``path,label`` (paths relative to the CSV's folder).

The transforms are built from :class:`~transfer_lit.preprocessing.Preprocessing`. When none is
given, the module the trainer runs supplies its own (the backbone's weights metadata), so the
data always matches the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from transfer_lit.data.base import LabelledDataModule
from transfer_lit.data.decode import (
    IMAGE_EXTENSIONS,
    BadImageError,
    BadImagePolicy,
    ImageDataset,
    Sample,
    collate_skipping_bad,
    scan_images,
)
from transfer_lit.data.feature_cache import CacheFeatures, FeatureCache, FeatureDataset, resolve_cache_features
from transfer_lit.data.held_out import split_record
from transfer_lit.data.reader import ImageReader, default_num_workers
from transfer_lit.data.skipped import SkippedFiles
from transfer_lit.data.splits import index_splits, list_images
from transfer_lit.data.stages import check_fractions, model_class_names
from transfer_lit.preprocessing import (
    Augment,
    ImagePreprocessing,
    build_eval_transform,
    build_train_transform,
    normalize_images,
)
from transfer_lit.protocols import Classifier, FeatureCacheable, HasPreprocessing


class ImageDataModule(LabelledDataModule):
    """Labelled images for transfer learning.

    Args:
        root: folder with ``train/`` + ``val/`` (+ ``test/``) class folders, or class folders directly.
        train_csv: CSV (``path,label``) of training images, instead of ``root``.
        val_csv: CSV of validation images (else a stratified split of the training set); with ``root``, it
            replaces a ``val/`` folder.
        test_csv: CSV of test images; with ``root``, it replaces a ``test/`` folder. Without ``root`` and
            ``train_csv`` (``test --ckpt_path X --data.test_csv t.csv``) the classes are the model's (its
            checkpoint's), and a label it does not know is an error.
        predict_root: folder of (unlabelled) images for ``predict``; searched recursively.
        val_fraction: share of each class held out for validation when there is no ``val/`` or ``val_csv``.
        test_fraction: share of each class held out as the test split (before ``val_fraction``, which stays a
            share of all the training data) when there is no ``test/`` or ``test_csv``: seeded and stratified,
            so ``fit`` never sees it and ``test`` with the same settings evaluates exactly it. ``0``: none.
        samples_per_class: few-shot training: keep this many training images per class (seeded).
        seed: seed of the split and the few-shot subsample.
        batch_size: images per batch (per device).
        num_workers: loader processes per training process; ``None`` = its share of the cores minus one
            (at most 8 on CPU, 16 with CUDA).
        augment: extra training augmentation: ``none``, ``trivialaugment`` or ``randaugment``.
        bad_images: what to do with unreadable images: ``error`` (name the file) or ``skip`` (count them).
        scan: decode every image before training to find all unreadable ones at once.
        preprocessing: transforms' preprocessing; ``None`` = the module's (from its checkpoint).
        cache_features: linear probes only (``model.mode: linear_probe``): ``auto`` computes the frozen
            backbone's validation features once and reuses them every epoch (results unchanged);
            ``true`` also trains the head on cached features of the training images, transformed like
            validation (resize + centre crop: no random crop, no flip; needs ``augment: none``), which
            makes every epoch after the first near-instant; ``false`` always reads images.
            Test and predict always read images; checkpoints hold the full backbone + head.
        feature_cache_dir: folder that keeps cached features across runs (keyed by backbone weights,
            preprocessing, precision and the files' paths, sizes and times); ``None`` = memory only.
        reduced_decode: decode a JPEG at libjpeg's reduced DCT scale when its shorter side is >= 4 x the
            preprocessing's resize size, keeping it >= 2 x (at most a few levels of 255 change after the resize;
            see :mod:`transfer_lit.data.reader`); ``False`` always decodes at full size.
        cache_dir: folder keeping every image resized once to the resize size (raw uint8; keyed by file,
            size, modification time and resize settings), so later epochs and runs read small files; the eval
            crop is unchanged, training crops come from the resized image. ``None``: no cache.
        normalize_on_device: the loader workers stop at uint8 images, and ``transfer_batch_to_device``
            scales and normalizes each batch on the training device: a quarter of the bytes through the
            workers' shared memory, pinned memory and the host-to-device copy, and less work per worker.
            Lightning calls that hook only when this module is passed as ``datamodule=``; ``False``
            normalizes in the workers, as a plain torchvision pipeline does.
    """

    def __init__(
        self,
        root: str | None = None,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        predict_root: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        samples_per_class: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: Augment = "none",
        bad_images: BadImagePolicy = "error",
        scan: bool = False,
        preprocessing: ImagePreprocessing | None = None,
        cache_features: CacheFeatures = "auto",
        feature_cache_dir: str | None = None,
        normalize_on_device: bool = True,
        reduced_decode: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        check_fractions(val_fraction, test_fraction)
        if bad_images not in ("error", "skip"):
            raise ValueError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
        if samples_per_class is not None and samples_per_class <= 0:
            raise ValueError(f"data.samples_per_class must be a positive integer, got {samples_per_class}")
        if (root is None) == (train_csv is None) and (root is not None or not (val_csv or test_csv or predict_root)):
            raise ValueError("give exactly one of data.root or data.train_csv (or only the data a command evaluates: "
                             "data.val_csv, data.test_csv or data.predict_root, with the model's classes)")
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.num_workers = num_workers
        self.bad_images, self.scan, self.preprocessing = bad_images, scan, preprocessing
        self.predict_root, self.normalize_on_device = predict_root, normalize_on_device
        self.reduced_decode, self.cache_dir = reduced_decode, cache_dir
        if cache_features not in (True, False, "auto"):
            raise ValueError(f"data.cache_features must be true, false or 'auto', got {cache_features!r}")
        self.cache_features = cache_features
        self.feature_cache = FeatureCache(feature_cache_dir)
        self.splits: dict[str, list[Sample]] = {}
        self.class_names: list[str] = []
        self.skipped = SkippedFiles()  # what the current stage left out, reported at its end
        self._logged_preprocessing = False
        index = (root, train_csv, val_csv, test_csv, val_fraction, samples_per_class, seed, test_fraction)
        # Without training data the labels are numbered by the model's classes, known at `setup`.
        self._deferred = None if root is not None or train_csv is not None else index
        if self._deferred is None:
            carved: list[str] = []
            self.class_names, self.splits = index_splits(*index, carved=carved)
            self.held_out = split_record(self.splits, carved, seed, val_fraction, test_fraction, root)

    def resolved_preprocessing(self) -> ImagePreprocessing:
        """Explicit ``preprocessing`` if given, else the attached module's (its checkpoint's, once restored)."""
        p = self._module_preprocessing() if self.preprocessing is None else self.preprocessing
        if not self._logged_preprocessing:  # logged where it is used, once per stage: after any checkpoint restore
            self._logged_preprocessing = True
            rank_zero_info(f"transfer_lit preprocessing: {p.to_dict()}")
        return p

    def _module_preprocessing(self) -> ImagePreprocessing:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, HasPreprocessing):
            raise RuntimeError("ImageDataModule needs `preprocessing` when it is not used with a TransferModule")
        if not isinstance(module.preprocessing, ImagePreprocessing):
            raise ValueError(f"ImageDataModule reads images, but the model's backbone takes "
                             f"{module.preprocessing.modality!r} inputs; use the data module of that modality")
        return module.preprocessing

    def setup(self, stage: str) -> None:
        self._logged_preprocessing = False
        self.skipped.clear()
        if self._deferred is not None and stage != "predict" and any(self._deferred[2:4]):  # val_csv, test_csv
            self.class_names, self.splits = index_splits(*self._deferred, class_names=model_class_names(self))
        if self.scan:
            self.scan_bad_images()

    def skipped_images(self) -> dict[str, list[str]]:
        """``{split: files}`` that ``bad_images='skip'`` left out while reading the current stage's data."""
        return self.skipped.unreadable()

    def take_skipped_inputs(self) -> dict[str, str]:
        """``{file: why}`` of the ``predict_root`` files left out (no image, unreadable); the caller reports them."""
        return self.skipped.take()

    def teardown(self, stage: str) -> None:
        self.skipped.report(getattr(stage, "value", stage))

    def scan_bad_images(self) -> list[BadImageError]:
        """Decode every image once; apply the ``bad_images`` policy to all failures at once."""
        paths = [p for split in self.splits.values() for p, _ in split]
        bad = scan_images(paths, num_workers=max(1, self.loader_workers()))
        if bad and self.bad_images == "error":
            listing = "\n  ".join(str(e) for e in bad[:20])
            raise BadImageError(bad[0].path, f"{len(bad)} unreadable image(s) (data.bad_images='error'; "
                                f"use 'skip' to leave them out):\n  {listing}")
        if bad:
            drop = {e.path for e in bad}
            self.splits = {s: [x for x in v if x[0] not in drop] for s, v in self.splits.items()}
            rank_zero_warn(f"transfer_lit data: skipped {len(bad)} unreadable image(s): {sorted(drop)[:5]}")
        return bad

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.splits:
            held_out = " (or hold it out of the training data: data.test_fraction)" if split == "test" else ""
            raise ValueError(f"no {split} data: add {split}/ under data.root or set data.{split}_csv{held_out}")
        p = self.resolved_preprocessing()
        module = self.trainer.lightning_module if self.trainer is not None else None
        if isinstance(module, Classifier) and module.task == "multilabel":
            raise ValueError("model.task='multilabel' needs several labels per image, but ImageDataModule reads one "
                             "per image (class folders, or path,label CSV files); use model.task 'multiclass' (or "
                             "'binary' for two classes), or a data module of your own for multi-label data")
        cached = resolve_cache_features(self.cache_features, module, split, self.augment)
        normalize = cached or not self.normalize_on_device  # feature extraction feeds the backbone itself
        transform = self.train_transform(p, normalize) if train and not cached else self.eval_transform(p, normalize)
        reader = ImageReader(p, self.reduced_decode, self.cache_dir)
        images = ImageDataset(self.splits[split], transform, self.bad_images, loader=reader)
        self.skipped.read(split, images)
        if cached and isinstance(module, FeatureCacheable):
            loader_kwargs = {"batch_size": self.batch_size, "num_workers": self.loader_workers(),
                             "collate_fn": collate_skipping_bad, "pin_memory": torch.cuda.is_available()}
            entry = self.feature_cache.features(self.trainer, module, images, self.splits[split], p, loader_kwargs,
                                                split, reader.describe())
            features = FeatureDataset(entry, self.splits[split])
            # Features are in memory already: worker processes would only add start-up and IPC cost.
            pin_memory = torch.cuda.is_available()
            if train:
                return self.shuffled_loader(features, pin_memory=pin_memory)
            return self.ordered_loader(features, batch_size=self.batch_size, pin_memory=pin_memory)
        return self._dataloader(images, shuffle=train)

    def train_transform(self, preprocessing: ImagePreprocessing, normalize: bool) -> Callable[[Any], torch.Tensor]:
        """The training images' transform: override it for augmentation of your own. Each image's runs under a seed
        of its own in torch, Python's ``random`` and NumPy, so a resumed run and any ``num_workers`` repeat it.
        ``normalize``: end in a normalized float tensor; ``False``: a uint8 one (normalized on the device)."""
        return build_train_transform(preprocessing, self.augment, normalize)

    def eval_transform(self, preprocessing: ImagePreprocessing, normalize: bool) -> Callable[[Any], torch.Tensor]:
        """The transform of validation, test and predict images (and of cached training features)."""
        return build_eval_transform(preprocessing, normalize)

    def loader_workers(self) -> int:
        """``num_workers``, or the default for this machine and the number of training processes on it."""
        if self.num_workers is not None:
            return self.num_workers
        if self.trainer is None:
            return default_num_workers()
        return default_num_workers(self.trainer.num_devices, self.trainer.strategy.root_device.type == "cuda")

    def _dataloader(self, dataset: Dataset, shuffle: bool, drop_last: bool | None = None) -> DataLoader:
        """Shuffled: the training loader (:meth:`shuffled_loader`; ``drop_last`` its rule unless given)."""
        workers = self.loader_workers()
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size, "collate_fn": collate_skipping_bad, "num_workers": workers,
            "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available(),
            **({} if drop_last is None else {"drop_last": drop_last})}
        if shuffle:  # each image's random crop seeded by (seed, epoch, image): the same with any number of workers
            return self.shuffled_loader(dataset, sample_seeds=True, **kwargs)
        return self.ordered_loader(dataset, **kwargs)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 image batch scaled and normalized with the checkpoint's mean and std, on its device."""
        return normalize_images(images, self.resolved_preprocessing())

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the batch, then normalize its uint8 images there (``normalize_on_device``); anything else as is.

        This hook, not ``on_after_batch_transfer``, so that a user's ``on_after_batch_transfer`` (GPU
        augmentation in a module or a subclass) still runs, and sees normalized float images as before.
        """
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor) \
                and batch[0].dtype == torch.uint8:
            images = self.normalize(batch[0])
            if self.trainer is not None:  # Lightning converted the inputs for `*-true` precision before the transfer
                images = self.trainer.precision_plugin.convert_input(images)
            batch = [images, *batch[1:]] if isinstance(batch, list) else (images, *batch[1:])
        return batch

    def predict_dataloader(self) -> DataLoader:
        if self.predict_root is None:
            raise ValueError("predict needs data.predict_root (a folder of images)")
        root = Path(self.predict_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.predict_root={self.predict_root!r}: no such directory")
        passed_over: list[Path] = []
        files = list_images(root, passed_over)
        if not files:
            raise ValueError(f"data.predict_root={self.predict_root!r} holds no images ({list(IMAGE_EXTENSIONS)})")
        p = self.resolved_preprocessing()
        dataset = ImageDataset([(str(f), -1) for f in files], self.eval_transform(p, not self.normalize_on_device),
                               self.bad_images, return_path=True, loader=ImageReader(p, self.reduced_decode))
        self.skipped.read("predict", dataset)
        if self.trainer is None or self.trainer.is_global_zero:  # every rank lists the same files: report them once
            self.skipped.pass_over(passed_over)
        return self._dataloader(dataset, shuffle=False)
