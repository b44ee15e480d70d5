"""TextDataModule: labelled texts (CSV / TSV files or ``.txt`` class folders), tokenized by the checkpoint's tokenizer.

The tokenizer and its limits come from :class:`~transfer_lit.preprocessing.TextPreprocessing`: by default the
attached module's (the backbone's, or a reloaded checkpoint's), so texts are always tokenized as the weights
expect. Training batches are length-bucketed and dynamically padded (:mod:`transfer_lit.data.text_batches`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from transfer_lit.data.base import LabelledDataModule
from transfer_lit.data.feature_cache import CacheFeatures, FeatureCache, FeatureDataset, resolve_cache_features
from transfer_lit.data.held_out import split_record
from transfer_lit.data.splits import carve_held_out, few_shot, number_labels, split_folders, stratified_split
from transfer_lit.data.stages import check_fractions, model_class_names
from transfer_lit.data.text_batches import LengthBucketSampler, TextCollator, TokenizedTexts
from transfer_lit.data.text_files import BadTexts, Column, TableFormat, check_texts, read_table, read_text_folders
from transfer_lit.preprocessing.text import TextPreprocessing, load_tokenizer
from transfer_lit.protocols import FeatureCacheable, HasPreprocessing

Tokenize = Literal["upfront", "workers"]
Rows = list[tuple[str, str, str]]  # (text, label, where)


def _class_order(labels: set[str]) -> list[str]:
    """Class names sorted as numbers when they all are (``0, 1, 2, 10``), else alphabetically."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


class TextDataModule(LabelledDataModule):
    """Labelled texts for transfer learning.

    Args:
        train_csv: CSV / TSV of training texts (``.tsv`` / ``.tab`` = tab-separated, ``.csv`` = comma; other
            names: a tab in the first line decides).
        val_csv: validation texts (else a seeded, stratified ``val_fraction`` of the training texts).
        test_csv: test texts. Given without ``train_csv`` and ``root`` (``test --ckpt_path X --data.test_csv t.csv``),
            as ``val_csv`` may be, its labels are the model's (its checkpoint's) classes; an unknown one is an error.
        predict_csv: texts for ``predict`` (a label column, if any, is ignored).
        root: instead of CSV files: ``root/<class>/*.txt`` (or ``root/train/<class>/``, ``root/val/...``).
        text_column: name or 0-based index of the text column; ``None``: the column named like text
            (``text``, ``sentence``, ``sms``...), else the one with the longest cells.
        label_column: name or index of the label column; ``None``: the one named like a label, else the other
            of two columns.
        header: whether the first row is a header; ``None``: yes when it holds such a column name.
        delimiter: ``auto``, ``\\t`` / ``tab``, ``,`` or any single character.
        encoding: the files' text encoding.
        val_fraction: share of each class held out for validation when there is no ``val_csv``.
        test_fraction: share of each class held out as the test split when there is no ``test_csv`` (seeded,
            stratified, before ``val_fraction``): ``fit`` never sees it, ``test`` evaluates exactly it. ``0``: none.
        samples_per_class: few-shot training: keep this many training texts per class (seeded).
        train_samples: keep a seeded, stratified subsample of this many training texts (taken after a validation
            split is held out of the training file, so validation keeps its full size).
        seed: seed of the split and the subsamples.
        batch_size: texts per batch (per device).
        num_workers: loader processes (tokenization happens there with ``tokenize: workers``).
        tokenize: ``upfront`` (every split tokenized once, in the main process) or ``workers`` (per text, in the
            loader workers: for corpora too large to hold tokenized).
        bucket_by_length: training batches of texts of similar length (less padding); ``False``: random batches.
        bad_texts: rows with an empty or whitespace-only text or label: ``error`` (name them) or ``skip``.
        preprocessing: the tokenizer settings; ``None`` = the module's (from its checkpoint).
        cache_features: as for images: linear probes compute the frozen encoder's features once (``auto``:
            validation; ``true``: training too, which is exact for text: there is no augmentation).
        feature_cache_dir: folder that keeps cached features across runs; ``None`` = memory only.
    """

    prediction_column = "text"

    def __init__(
        self,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        predict_csv: str | None = None,
        root: str | None = None,
        text_column: Column = None,
        label_column: Column = None,
        header: bool | None = None,
        delimiter: str = "auto",
        encoding: str = "utf-8",
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        samples_per_class: int | None = None,
        train_samples: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenize: Tokenize = "upfront",
        bucket_by_length: bool = True,
        bad_texts: BadTexts = "error",
        preprocessing: TextPreprocessing | None = None,
        cache_features: CacheFeatures = "auto",
        feature_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for key, count in (("batch_size", batch_size), ("samples_per_class", samples_per_class),
                           ("train_samples", train_samples)):
            if count is not None and (not isinstance(count, int) or count <= 0):
                raise ValueError(f"data.{key} must be a positive integer, got {count!r}")
        check_fractions(val_fraction, test_fraction)
        choices: list[tuple[str, Any, tuple[Any, ...]]] = [
            ("tokenize", tokenize, ("upfront", "workers")), ("bad_texts", bad_texts, ("error", "skip")),
            ("cache_features", cache_features, (True, False, "auto"))]
        for key, value, valid in choices:
            if value not in valid:
                raise ValueError(f"data.{key} must be one of {list(valid)}, got {value!r}")
        if (root is None) == (train_csv is None) and (root is not None or not (val_csv or test_csv or predict_csv)):
            raise ValueError("give exactly one of data.train_csv or data.root (or only the data a command evaluates: "
                             "data.val_csv, data.test_csv or data.predict_csv, with the model's classes)")
        self.fmt = TableFormat(text_column, label_column, header, delimiter, encoding)
        self.batch_size, self.num_workers, self.seed, self.tokenize = batch_size, num_workers, seed, tokenize
        self.bucket_by_length, self.bad_texts, self.preprocessing = bucket_by_length, bad_texts, preprocessing
        self.predict_csv, self.cache_features = predict_csv, cache_features
        self.feature_cache = FeatureCache(feature_cache_dir)
        self.splits: dict[str, list[tuple[str, int]]] = {}
        self.class_names: list[str] = []
        self._tokenized: dict[tuple[str, str], TokenizedTexts] = {}
        self._tokenizers: dict[str, Any] = {}
        index = (root, train_csv, val_csv, test_csv, val_fraction, samples_per_class, train_samples, test_fraction)
        # Without training data the labels are numbered by the model's classes, known at `setup`.
        self._deferred = None if root is not None or train_csv is not None else index
        if self._deferred is None:
            self._index(*index)

    def setup(self, stage: str) -> None:
        if self._deferred is not None and stage != "predict" and any(self._deferred[2:4]):  # val_csv, test_csv
            self._index(*self._deferred, class_names=model_class_names(self))

    def _read(self, key: str, value: str, labelled: bool = True) -> Rows:
        rows = read_table(Path(value).expanduser(), key, self.fmt, labelled)
        return [(text, label, f"{value}:{line}") for text, label, line in rows]

    def _index(self, root: str | None, train_csv: str | None, val_csv: str | None, test_csv: str | None,
               val_fraction: float, samples_per_class: int | None, train_samples: int | None,
               test_fraction: float = 0.0, class_names: list[str] | None = None) -> None:
        rows: dict[str, Rows] = {}
        if root is not None:
            base = Path(root).expanduser()
            if not base.is_dir():
                raise FileNotFoundError(f"data.root={root!r}: no such directory" if not base.exists() else
                                        f"data.root={root!r} is a file; a CSV / TSV file goes to data.train_csv")
            found = split_folders(base, "data.root") or {"train": base}
            if "train" not in found:
                raise FileNotFoundError(f"data.root={root!r} has {sorted(f.name + '/' for f in found.values())} but "
                                        f"no train/ folder")
            for split, folder in found.items():
                by_class = read_text_folders(folder, f"data.root ({folder.name}/)", self.fmt.encoding)
                rows[split] = [(t, c, f) for c, items in by_class.items() for t, f in items]
        for split, path in (("train", train_csv), ("val", val_csv), ("test", test_csv)):
            if path is not None:
                rows[split] = self._read(f"data.{split}_csv", path)
        rows = {split: check_texts(r, self.bad_texts, split) for split, r in rows.items()}
        grouped = {split: _by_class(r) for split, r in rows.items()}
        carved = carve_held_out(grouped, val_fraction, test_fraction, self.seed)
        self.class_names = list(class_names) if class_names is not None else _class_order(set(grouped["train"]))
        if train_samples is not None and "train" in grouped:
            grouped["train"] = _subsample(grouped["train"], train_samples, self.seed)
        if samples_per_class is not None and "train" in grouped:
            grouped["train"] = few_shot(grouped["train"], samples_per_class, self.seed, "data.samples_per_class")
        # Evaluation splits interleave the classes: the sanity check and limit_val_batches then see all of them.
        self.splits = number_labels(grouped, self.class_names, class_names is not None, noun="labels")
        self.held_out = split_record(self.splits, carved, self.seed, val_fraction, test_fraction)
        counts = {s: len(v) for s, v in self.splits.items()}
        for split, samples in self.splits.items():
            if not samples:
                raise ValueError(f"data: the {split} split has no texts (texts per split: {counts})")
        rank_zero_info(f"transfer_lit data: {len(self.class_names)} classes {self.class_names[:10]}, texts {counts}")

    def resolved_preprocessing(self) -> TextPreprocessing:
        """Explicit ``preprocessing`` if given, else the attached module's (its checkpoint's, once restored)."""
        if self.preprocessing is not None:
            return self.preprocessing
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, HasPreprocessing):
            raise RuntimeError("TextDataModule needs `preprocessing` when it is not used with a TransferModule")
        if not isinstance(module.preprocessing, TextPreprocessing):
            raise ValueError(f"TextDataModule reads texts, but the model's backbone takes "
                             f"{module.preprocessing.modality!r} inputs; use the data module of that modality "
                             f"(e.g. transfer_lit.ImageDataModule) or a text backbone (transfer_lit.HFTextBackbone)")
        return module.preprocessing

    def tokenizer(self, p: TextPreprocessing) -> Any:
        """The Hugging Face tokenizer of ``p`` (loaded once, checked against its pinned hash)."""
        key = repr(p)
        if key not in self._tokenizers:
            rank_zero_info(f"transfer_lit preprocessing: {p.to_dict()}")
            self._tokenizers[key] = load_tokenizer(p)
        return self._tokenizers[key]

    def dataset(self, split: str, texts: list[str], targets: list[Any]) -> TokenizedTexts:
        """``split``'s texts tokenized as the module expects (once per split and preprocessing with ``upfront``)."""
        p = self.resolved_preprocessing()
        key = (split, repr(p))
        if key in self._tokenized:
            return self._tokenized[key]
        tokenizer = self.tokenizer(p)
        options = {"truncation": True, "max_length": p.max_length, "return_attention_mask": False,
                   "return_token_type_ids": False}
        if self.tokenize == "workers":
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers: no deadlock warnings
            dataset = TokenizedTexts(targets, texts=texts, tokenize=_Tokenize(tokenizer, options))
        else:
            encoded = tokenizer(texts, **options)["input_ids"]
            full = tokenizer(texts, truncation=False, return_attention_mask=False, return_token_type_ids=False,
                             verbose=False)["input_ids"]
            long = sum(len(ids) > p.max_length for ids in full)
            if long:
                share = 100 * long / len(texts)
                rank_zero_info(f"transfer_lit data: {long} of {len(texts)} {split} texts ({share:.1f}%) are longer "
                               f"than max_length={p.max_length} tokens and are cut on the {p.truncation_side} "
                               f"(model.preprocessing.max_length / truncation_side)")
            dataset = TokenizedTexts(targets, encoded=[{"input_ids": ids} for ids in encoded])
        self._tokenized[key] = dataset
        return dataset

    def collator(self) -> TextCollator:
        """Pads batches as ``preprocessing.padding`` says, building the inputs the tokenizer's model takes."""
        p = self.resolved_preprocessing()
        tokenizer = self.tokenizer(p)
        return TextCollator(tokenizer.pad_token_id, tokenizer.model_input_names,
                            p.max_length if p.padding == "max_length" else None)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"no {split} data: set data.{split}_csv (or add {split}/ under data.root)")
        samples = self.splits[split]
        dataset = self.dataset(split, [t for t, _ in samples], [label for _, label in samples])
        module = self.trainer.lightning_module if self.trainer is not None else None
        if resolve_cache_features(self.cache_features, module, split, "none") and isinstance(module, FeatureCacheable):
            kwargs = {"batch_size": self.batch_size, "num_workers": self.num_workers, "collate_fn": self.collator()}
            entry = self.feature_cache.features(self.trainer, module, dataset, samples, self.resolved_preprocessing(),
                                                kwargs, split, reader="text", files=_texts_fingerprint(samples))
            features = FeatureDataset(entry, samples)
            return (self.shuffled_loader(features) if train
                    else self.ordered_loader(features, batch_size=self.batch_size))
        common: dict[str, Any] = {
            "batch_size": self.batch_size, "num_workers": self.num_workers, "collate_fn": self.collator(),
            "persistent_workers": self.num_workers > 0, "pin_memory": torch.cuda.is_available()}
        if not train:
            return self.ordered_loader(dataset, **common)
        world, rank = self.world()
        sampler = (LengthBucketSampler(dataset.lengths(), self.batch_size, world, rank, self.seed,
                                       drop_last=len(dataset) > self.batch_size * world)
                   if self.bucket_by_length else None)
        return self.shuffled_loader(dataset, sampler=sampler, **common)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_csv is None:
            raise ValueError("predict needs data.predict_csv (a CSV / TSV file with a text column)")
        rows = self._read("data.predict_csv", self.predict_csv, labelled=False)
        rows = check_texts([(t, "?", w) for t, _, w in rows], self.bad_texts, "predict")
        texts = [t for t, _, _ in rows]
        dataset = self.dataset(f"predict:{self.predict_csv}", texts, texts)
        return self.ordered_loader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                   collate_fn=self.collator())


class _Tokenize:
    """Picklable ``text -> encoded`` for tokenization in loader workers."""

    def __init__(self, tokenizer: Any, options: dict[str, Any]) -> None:
        self.tokenizer, self.options = tokenizer, options

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.tokenizer(text, **self.options)["input_ids"]}


def _by_class(rows: Rows) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for text, label, _ in rows:
        grouped.setdefault(label, []).append(text)
    return dict(sorted(grouped.items()))


def _subsample(by_class: dict[str, list[str]], total: int, seed: int) -> dict[str, list[str]]:
    """A seeded subsample of about ``total`` texts, each class keeping its share (at least one text)."""
    size = sum(len(v) for v in by_class.values())
    if total >= size:
        return by_class
    _, kept = stratified_split(by_class, total / size, seed)
    return kept


def _texts_fingerprint(samples: list[tuple[str, int]]) -> str:
    """Hash of a split's texts, in order (the feature cache's key for text, as file stats are for images)."""
    digest = hashlib.sha256()
    for text, _ in samples:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()
