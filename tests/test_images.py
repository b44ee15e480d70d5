"""Tests for transfer_lit.data on small image folders written in tmp_path."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import COLORS, TinyBackbone, make_image_folder
from lightning.pytorch import Trainer, seed_everything
from PIL import Image

from transfer_lit import BadImageError, ImageDataModule, ImagePreprocessing, TransferModule
from transfer_lit.data import default_num_workers
from transfer_lit.data.order import EpochShuffle
from transfer_lit.errors import user_error_message
from transfer_lit.preprocessing import normalize_images
from transfer_lit.protocols import CachedFeatures

CLASSES = sorted(COLORS)  # ['blue', 'green', 'red']
SMALL = ImagePreprocessing(28, 24, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _files(dm: ImageDataModule, split: str) -> set[str]:
    return {path for path, _ in dm.splits[split]}


def _trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)


def _corrupt_jpeg(path: Path) -> Path:
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return path


# ----------------------------------------------------------------- layouts


def test_train_val_test_folders(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), num_workers=0)
    assert dm.class_names == CLASSES and dm.num_classes == 3
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 36, "val": 18, "test": 18}
    for split, samples in dm.splits.items():
        for path, label in samples:
            assert Path(path).parent.name == CLASSES[label]
            assert Path(path).parts[-3] == split
    assert dm.class_counts("val") == {"blue": 6, "green": 6, "red": 6}


def test_single_folder_gets_seeded_stratified_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"all": 10}) / "all"
    dm = ImageDataModule(root=str(root), val_fraction=0.2, seed=1, num_workers=0)
    assert set(dm.splits) == {"train", "val"}
    assert dm.class_counts("train") == dict.fromkeys(CLASSES, 8)
    assert dm.class_counts("val") == dict.fromkeys(CLASSES, 2)
    assert not _files(dm, "train") & _files(dm, "val")
    assert len(_files(dm, "train") | _files(dm, "val")) == 30

    same = ImageDataModule(root=str(root), val_fraction=0.2, seed=1, num_workers=0)
    assert same.splits == dm.splits
    other = ImageDataModule(root=str(root), val_fraction=0.2, seed=2, num_workers=0)
    assert _files(other, "val") != _files(dm, "val")
    assert other.class_counts("val") == dict.fromkeys(CLASSES, 2)


def test_train_without_val_is_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"train": 5, "test": 2})
    dm = ImageDataModule(root=str(root), val_fraction=0.4, num_workers=0)
    assert dm.class_counts("train") == dict.fromkeys(CLASSES, 3)
    assert dm.class_counts("val") == dict.fromkeys(CLASSES, 2)
    assert dm.class_counts("test") == dict.fromkeys(CLASSES, 2)


def _write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, ...] = ("path", "label")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows(root: Path, split: str) -> list[tuple[str, str]]:
    return [(str(p.relative_to(root)), p.parent.name) for p in sorted((root / split).rglob("*.png"))]


def test_csv_with_relative_paths(image_folder: Path) -> None:
    train = _write_csv(image_folder / "train.csv", _rows(image_folder, "train"))
    val = _write_csv(image_folder / "val.csv", _rows(image_folder, "val"))
    test = _write_csv(image_folder / "test.csv", _rows(image_folder, "test")[:5])
    dm = ImageDataModule(train_csv=str(train), val_csv=str(val), test_csv=str(test), num_workers=0)
    assert dm.class_names == CLASSES
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 36, "val": 18, "test": 5}
    folder = ImageDataModule(root=str(image_folder), num_workers=0)
    assert sorted(dm.splits["train"]) == sorted(folder.splits["train"])  # same files, same labels
    assert all(Path(p).is_absolute() or Path(p).is_file() for p, _ in dm.splits["train"])


def test_csv_without_val_is_split(image_folder: Path) -> None:
    train = _write_csv(image_folder / "train.csv", _rows(image_folder, "train"))
    dm = ImageDataModule(train_csv=str(train), val_fraction=0.25, num_workers=0)
    assert dm.class_counts("train") == dict.fromkeys(CLASSES, 9)
    assert dm.class_counts("val") == dict.fromkeys(CLASSES, 3)


def test_few_shot_exact_and_seeded(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), samples_per_class=5, seed=0, num_workers=0)
    assert dm.class_counts("train") == dict.fromkeys(CLASSES, 5)
    assert dm.class_counts("val") == dict.fromkeys(CLASSES, 6)  # only training images are subsampled
    again = ImageDataModule(root=str(image_folder), samples_per_class=5, seed=0, num_workers=0)
    assert _files(again, "train") == _files(dm, "train")
    other = ImageDataModule(root=str(image_folder), samples_per_class=5, seed=3, num_workers=0)
    assert _files(other, "train") != _files(dm, "train")
    full = ImageDataModule(root=str(image_folder), samples_per_class=12, num_workers=0)
    assert len(full.splits["train"]) == 36


def test_class_names_sorted_and_labels_follow_them(tmp_path: Path) -> None:
    for name in ("zebra", "Apple", "mango"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / name / f"{i}.png")
    dm = ImageDataModule(root=str(tmp_path), num_workers=0)
    assert dm.class_names == ["Apple", "mango", "zebra"]
    for split in ("train", "val"):
        assert all(dm.class_names[label] == Path(path).parent.name for path, label in dm.splits[split])


# ----------------------------------------------------------------- transforms from the module


def test_transforms_come_from_the_module(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0)
    with pytest.raises(RuntimeError, match="preprocessing"):
        dm.resolved_preprocessing()  # no trainer, no module yet
    backbone = TinyBackbone(image_size=20)
    module = TransferModule(backbone, num_classes=dm.num_classes, class_names=dm.class_names)
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)
    assert dm.resolved_preprocessing() == backbone.preprocessing == module.preprocessing
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (4, 3, 20, 20) and x.dtype == torch.uint8  # normalized on the training device
        assert y.dtype == torch.int64
        x, y = dm.transfer_batch_to_device([x, y], torch.device("cpu"), 0)
        assert x.shape == (4, 3, 20, 20) and x.dtype == torch.float32


def test_explicit_preprocessing_wins(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0, preprocessing=SMALL)
    module = TransferModule(TinyBackbone(image_size=20), num_classes=3)
    _trainer().validate(module, datamodule=dm)
    assert dm.resolved_preprocessing() == SMALL
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[-2:] == (24, 24)
    x = dm.normalize(x)[y == dm.class_names.index("blue")]  # validation interleaves the classes
    # Normalised with the explicit statistics: the blue class' blue channel is far above its red one.
    assert len(x) and (x[:, 2] - x[:, 0]).mean() > 2


def test_predict_loader_returns_paths(image_folder: Path) -> None:
    dm = ImageDataModule(predict_root=str(image_folder / "test"), batch_size=50, num_workers=0, preprocessing=SMALL)
    x, paths = next(iter(dm.predict_dataloader()))
    assert x.shape == (18, 3, 24, 24)
    assert sorted(paths) == sorted(str(p) for p in (image_folder / "test").rglob("*.png"))


# ----------------------------------------------------------------- DataLoader defaults


@pytest.mark.parametrize(("cores", "devices", "cuda", "workers"), [
    (1, 1, False, 0), (2, 1, False, 1), (4, 1, False, 3), (64, 1, False, 8),
    (2, 1, True, 1), (16, 1, True, 15), (64, 1, True, 16), (64, 8, True, 7), (8, 8, True, 0),
])
def test_default_num_workers_from_core_count(
    monkeypatch: pytest.MonkeyPatch, cores: int, devices: int, cuda: bool, workers: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_num_workers(devices, cuda) == workers


def test_loader_defaults(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), preprocessing=SMALL)
    assert dm.num_workers is None and dm.loader_workers() == default_num_workers()
    dm.num_workers = 0  # set after construction: still what the loaders get
    assert dm.train_dataloader().num_workers == 0
    for workers in (0, 2):
        dm = ImageDataModule(root=str(image_folder), batch_size=5, num_workers=workers, preprocessing=SMALL)
        train, val = dm.train_dataloader(), dm.val_dataloader()
        assert train.num_workers == val.num_workers == workers
        assert train.persistent_workers is val.persistent_workers is (workers > 0)
        assert train.pin_memory is val.pin_memory is torch.cuda.is_available()
        assert train.batch_size == 5 and train.drop_last and not val.drop_last
        assert isinstance(train.sampler, EpochShuffle) and train.sampler.sample_seeds  # resumable, seeded crops
        assert isinstance(val.sampler, torch.utils.data.SequentialSampler)


@pytest.mark.parametrize("distributed", [True, False])
def test_the_training_data_are_sharded_unless_the_trainer_says_not(image_folder: Path, distributed: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 reads half the training images; with ``trainer.use_distributed_sampler: false`` every rank reads
    them all, as Lightning leaves a loader then (before: sharded anyway)."""
    monkeypatch.setattr(Trainer, "world_size", property(lambda self: 2))
    monkeypatch.setattr(Trainer, "global_rank", property(lambda self: 1))
    dm = ImageDataModule(root=str(image_folder), batch_size=6, num_workers=0, preprocessing=SMALL)
    dm.trainer = Trainer(use_distributed_sampler=distributed, logger=False, enable_checkpointing=False)
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank, len(list(sampler))) == ((2, 1, 18) if distributed else (1, 0, 36))


class NoisyImages(ImageDataModule):
    """A user's own augmentation that draws from Python's ``random`` and NumPy, not torch: here only the draws."""

    def train_transform(self, preprocessing: ImagePreprocessing, normalize: bool) -> Any:
        return _draws


def _draws(image: Any) -> torch.Tensor:
    return torch.tensor([random.random(), float(np.random.rand())], dtype=torch.float64)


def test_augmentations_of_ones_own_from_random_and_numpy_repeat_with_any_workers(image_folder: Path) -> None:
    """Each image's transform runs under its own seed in torch, ``random`` and NumPy: the same draws whichever
    process decodes it (before: a worker's stream, or the main process's), another epoch other draws; the main
    process's streams are not moved by an image decoded in it."""
    epochs = {}
    for workers in (0, 2):
        dm = NoisyImages(root=str(image_folder), batch_size=6, num_workers=workers, preprocessing=SMALL)
        loader = dm.train_dataloader()
        epochs[workers] = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            epochs[workers].append(torch.cat([x for x, _ in loader]))
    assert epochs[0][0].shape == (36, 2)  # the subclass's transform: 36 training images, two draws each
    assert torch.equal(epochs[0][0], epochs[2][0]) and torch.equal(epochs[0][1], epochs[2][1])
    assert not torch.equal(epochs[0][0], epochs[0][1])
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    next(iter(NoisyImages(root=str(image_folder), batch_size=6, num_workers=0, preprocessing=SMALL)
              .train_dataloader()))
    assert (random.random(), np.random.rand()) == expected


class PooledBatchNorm(TinyBackbone):
    """TinyBackbone with a BatchNorm after the pooling: one value per channel in a batch of one image."""

    def __init__(self) -> None:
        super().__init__(image_size=16)
        self.block2.append(torch.nn.BatchNorm1d(self.num_features))


def _batchnorm_head(features: int, outputs: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.BatchNorm1d(features), torch.nn.Linear(features, outputs))


@pytest.mark.parametrize(("model", "crashes"), [
    ({}, True), ({"mode": "progressive", "bn_policy": "train"}, True),
    ({"mode": "linear_probe", "head": _batchnorm_head}, True),
    ({"bn_policy": "frozen"}, False), ({"mode": "linear_probe"}, False),
])
def test_batch_size_one_with_batchnorm_on_batch_statistics_is_one_message_naming_data_batch_size(
        tmp_path: Path, model: dict[str, Any], crashes: bool) -> None:
    """It was torch's "Expected more than 1 value per channel when training" and its traceback; a BatchNorm that
    sees a whole feature map (one image is many values per channel) or runs in eval mode trains on batches of one."""
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1}, size=16)
    data = ImageDataModule(root=str(root), batch_size=1, num_workers=0)
    torch.manual_seed(0)
    module = TransferModule(PooledBatchNorm(), num_classes=3, **model)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    if not crashes:
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 6
        return
    with pytest.raises(ValueError) as raised:
        trainer.fit(module, datamodule=data)
    message = user_error_message(raised.value)
    assert message is not None and message.startswith("a BatchNorm layer that trains on batch statistics got a "
                                                      "training batch of one sample")
    assert "valid: data.batch_size >= 2, or the backbone's BatchNorm in eval mode (model.bn_policy: frozen" in message


def test_a_batch_of_one_left_by_skipped_images_names_the_skip_and_the_scan(tmp_path: Path) -> None:
    """``data.batch_size: 2`` and one unreadable image: ``skip`` leaves its batch one image, which a BatchNorm over
    pooled features cannot train on; the message says where the batch of one came from, not only the batch size."""
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1}, size=16)
    next((root / "train" / "red").iterdir()).write_bytes(b"not an image")
    data = ImageDataModule(root=str(root), batch_size=2, num_workers=0, bad_images="skip")
    module = TransferModule(PooledBatchNorm(), num_classes=3)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError) as raised:
        trainer.fit(module, datamodule=data)
    message = user_error_message(raised.value)
    assert message is not None and "training batch of one sample" in message
    assert "unreadable images data.bad_images: skip leaves out of it" in message and "data.scan: true" in message


# ----------------------------------------------------------------- errors name the key, the value, the fix


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"data\.root=.*nowhere.*no such directory"):
        ImageDataModule(root=str(missing))


def test_root_without_class_folders(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"data\.root.*has no class sub-folders; expected .*<class name>"):
        ImageDataModule(root=str(tmp_path))


def test_val_without_train(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"val": 2})
    with pytest.raises(FileNotFoundError, match=r"data\.root=.*has val/ or test/ but no train/"):
        ImageDataModule(root=str(root))


def test_empty_class_folder(image_folder: Path) -> None:
    (image_folder / "train" / "purple").mkdir()
    (image_folder / "train" / "purple" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"data\.root \(train/\).*\['purple'\] contain no images.*\.jpg"):
        ImageDataModule(root=str(image_folder))


def test_class_in_val_not_in_train(image_folder: Path) -> None:
    (image_folder / "val" / "purple").mkdir()
    Image.new("RGB", (8, 8)).save(image_folder / "val" / "purple" / "p.png")
    with pytest.raises(ValueError, match=r"\['purple'\] appear in val but not in train.*\['blue', 'green', 'red'\]"):
        ImageDataModule(root=str(image_folder))


def test_csv_label_in_val_not_in_train(image_folder: Path) -> None:
    train = _write_csv(image_folder / "train.csv", _rows(image_folder, "train"))
    val = _write_csv(image_folder / "val.csv", [("val/red/red_0.png", "crimson")])
    with pytest.raises(ValueError, match=r"\['crimson'\] appear in val but not in train"):
        ImageDataModule(train_csv=str(train), val_csv=str(val))


def test_fewer_images_than_samples_per_class(image_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.samples_per_class=13 .*fewer.*'blue': 12"):
        ImageDataModule(root=str(image_folder), samples_per_class=13)


def test_csv_with_missing_file(image_folder: Path) -> None:
    rows = [*_rows(image_folder, "train"), ("train/red/ghost.png", "red")]
    train = _write_csv(image_folder / "train.csv", rows)
    with pytest.raises(FileNotFoundError, match=r"data\.train_csv=.*train\.csv.* 1 file\(s\) that do not exist.*ghost"):
        ImageDataModule(train_csv=str(train))


def test_csv_with_wrong_header(image_folder: Path) -> None:
    train = _write_csv(image_folder / "train.csv", _rows(image_folder, "train"), header=("file", "class"))
    with pytest.raises(ValueError, match=r"data\.train_csv=.*columns 'path' and 'label', got \['file', 'class'\]"):
        ImageDataModule(train_csv=str(train))


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.train_csv=.*nope\.csv.*no such file"):
        ImageDataModule(train_csv=str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"data\.batch_size must be a positive integer, got 0"),
        ({"batch_size": -4}, r"data\.batch_size must be a positive integer, got -4"),
        ({"samples_per_class": 0}, r"data\.samples_per_class must be a positive integer, got 0"),
        ({"val_fraction": 1.0}, r"data\.val_fraction must be in \(0, 1\), got 1\.0"),
        ({"bad_images": "ignore"}, r"data\.bad_images must be 'error' or 'skip', got 'ignore'"),
    ],
)
def test_bad_arguments(image_folder: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageDataModule(root=str(image_folder), **kwargs)


def test_no_root_and_no_csv() -> None:
    with pytest.raises(ValueError, match=r"data\.root or data\.train_csv"):
        ImageDataModule()


def test_missing_test_split(tmp_path: Path) -> None:
    dm = ImageDataModule(root=str(make_image_folder(tmp_path, {"train": 3, "val": 1})), preprocessing=SMALL)
    with pytest.raises(ValueError, match=r"no test data: add test/ under data\.root or set data\.test_csv"):
        dm.test_dataloader()


# ----------------------------------------------------------------- unreadable images


def test_bad_image_error_names_the_file(image_folder: Path) -> None:
    bad = _corrupt_jpeg(image_folder / "val" / "red" / "broken.jpg")
    dm = ImageDataModule(root=str(image_folder), batch_size=64, num_workers=0, preprocessing=SMALL)
    with pytest.raises(BadImageError, match=r"broken\.jpg") as info:
        next(iter(dm.val_dataloader()))
    assert info.value.path == str(bad)


def test_jpeg_damaged_mid_stream_is_refused_by_the_loader_and_the_scan(image_folder: Path) -> None:
    path = image_folder / "train" / "red" / "damaged.jpg"
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(path, "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3] + b"\xff\xd9")  # the end marker written early: no Pillow error
    dm = ImageDataModule(root=str(image_folder), batch_size=64, num_workers=0, preprocessing=SMALL)
    dm.setup("fit")
    with pytest.raises(BadImageError, match="damaged JPEG data") as info:
        next(iter(dm.train_dataloader()))
    assert info.value.path == str(path)
    dm = ImageDataModule(root=str(image_folder), scan=True, num_workers=0, preprocessing=SMALL)
    with pytest.raises(BadImageError, match=r"1 unreadable image\(s\)") as info:
        dm.setup("fit")
    assert str(path) in str(info.value) and "premature end of data segment" in str(info.value)


def test_bad_image_skip_drops_it(image_folder: Path) -> None:
    _corrupt_jpeg(image_folder / "val" / "red" / "broken.jpg")
    dm = ImageDataModule(root=str(image_folder), batch_size=64, num_workers=0, bad_images="skip", preprocessing=SMALL)
    assert len(dm.splits["val"]) == 19  # found by extension, unreadable
    x, y = next(iter(dm.val_dataloader()))
    assert len(x) == len(y) == 18


def test_scan_finds_every_bad_file_at_once(image_folder: Path) -> None:
    bad = {_corrupt_jpeg(image_folder / "train" / "red" / "broken.jpg"),
           _corrupt_jpeg(image_folder / "val" / "blue" / "also_broken.png")}
    dm = ImageDataModule(root=str(image_folder), scan=True, num_workers=0, preprocessing=SMALL)
    with pytest.raises(BadImageError, match=r"2 unreadable image\(s\).*'skip'") as info:
        dm.setup("fit")
    assert all(str(path) in str(info.value) for path in bad)

    dm = ImageDataModule(root=str(image_folder), scan=True, bad_images="skip", num_workers=0, preprocessing=SMALL)
    dm.setup("fit")
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 36, "val": 18, "test": 18}
    assert not {str(p) for p in bad} & {p for split in dm.splits.values() for p, _ in split}


# ----------------------------------------------------------------------------- normalize_on_device


def test_normalizing_on_the_device_equals_normalizing_in_the_workers(image_folder: Path) -> None:
    on_device = ImageDataModule(root=str(image_folder), batch_size=6, num_workers=0, preprocessing=SMALL)
    in_workers = ImageDataModule(root=str(image_folder), batch_size=6, num_workers=0, preprocessing=SMALL,
                                 normalize_on_device=False)
    (u8, y8), (f32, y32) = next(iter(on_device.val_dataloader())), next(iter(in_workers.val_dataloader()))
    assert u8.dtype == torch.uint8 and f32.dtype == torch.float32 and torch.equal(y8, y32)
    assert u8.numel() == f32.numel()  # a quarter of the bytes through shared and pinned memory
    moved = on_device.transfer_batch_to_device([u8, y8], torch.device("cpu"), 0)
    assert torch.equal(moved[0], f32)  # the same arithmetic, bit for bit
    assert normalize_images(u8, SMALL).equal(f32)
    cached = CachedFeatures(torch.randn(2, 4), torch.tensor([0, 1]))
    moved_cached = on_device.transfer_batch_to_device(cached, torch.device("cpu"), 0)  # float batches pass untouched
    assert isinstance(moved_cached, CachedFeatures) and moved_cached.features is cached.features


def test_training_is_the_same_whether_workers_or_the_device_normalize(image_folder: Path) -> None:
    weights = []
    for normalize_on_device in (True, False):
        seed_everything(0)
        dm = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0,
                             normalize_on_device=normalize_on_device)
        module = TransferModule(TinyBackbone(image_size=20), num_classes=dm.num_classes, mode="finetune")
        Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=dm)
        weights.append(module.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0, msg=name)


def test_true_precision_gets_normalized_images_in_its_dtype(image_folder: Path) -> None:
    """Lightning converts ``*-true`` inputs before the transfer, when they are still uint8: the hook converts after."""
    dm = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0)
    module = TransferModule(TinyBackbone(image_size=20), num_classes=dm.num_classes)
    trainer = Trainer(accelerator="cpu", devices=1, precision="bf16-true", limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=dm)
    x = dm.transfer_batch_to_device(next(iter(dm.val_dataloader())), torch.device("cpu"), 0)[0]
    assert x.dtype == torch.bfloat16


def test_uint8_images_without_the_datamodule_hook_get_a_clear_error(image_folder: Path) -> None:
    dm = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0, preprocessing=SMALL)
    module = TransferModule(TinyBackbone(image_size=24), num_classes=dm.num_classes)
    with pytest.raises(TypeError, match="normalize_on_device"):
        _trainer().validate(module, dataloaders=dm.val_dataloader())  # a loader, not `datamodule=`


def test_normalize_follows_the_preprocessing_it_meets(image_folder: Path) -> None:
    """A data module reused with another checkpoint normalizes with that checkpoint's statistics."""
    dm = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0, preprocessing=SMALL)
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(dm.normalize(images), torch.full((1, 3, 2, 2), 2.0))  # (1 - 0.5) / 0.25
    dm.preprocessing = ImagePreprocessing(28, 24, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.allclose(dm.normalize(images), torch.ones(1, 3, 2, 2))


class HookedModule(TransferModule):
    """Research code's GPU augmentation: it must still run, on normalized float images."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.seen.append((batch[0].dtype, float(batch[0].min())))
        return batch


class HookedData(ImageDataModule):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:  # no super(): the base does nothing
        self.seen.append((batch[0].dtype, float(batch[0].min())))
        return batch


@pytest.mark.parametrize("hooked", ["module", "datamodule"])
def test_a_users_on_after_batch_transfer_runs_and_sees_normalized_images(image_folder: Path, hooked: str) -> None:
    data_cls = HookedData if hooked == "datamodule" else ImageDataModule
    dm = data_cls(root=str(image_folder), batch_size=4, num_workers=0, preprocessing=SMALL)
    module_cls = HookedModule if hooked == "module" else TransferModule
    module = module_cls(TinyBackbone(image_size=24), num_classes=dm.num_classes)
    owner = module if hooked == "module" else dm
    owner.seen = []  # type: ignore[union-attr]
    _trainer().fit(module, datamodule=dm)
    assert owner.seen and all(dtype == torch.float32 for dtype, _ in owner.seen)  # type: ignore[union-attr]
    assert min(low for _, low in owner.seen) < 0  # type: ignore[union-attr]  # normalized: (0 - 0.5) / 0.25 = -2


def test_multilabel_with_one_label_per_image_is_refused_before_training(image_folder: Path) -> None:
    data = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0)
    model = TransferModule(TinyBackbone(), num_classes=3, task="multilabel")
    with pytest.raises(ValueError, match=r"model\.task='multilabel' needs several labels per image"):
        _trainer().fit(model, datamodule=data)
