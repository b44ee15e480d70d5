"""Which files make up each split (transfer_lit.data.splits), on the messy folders users have: capitalised and
synonym split folders, hidden sub-folders, broken links, a BOM or header-only CSV, empty splits."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_image_folder

from transfer_lit import ImageDataModule
from transfer_lit.data.splits import index_splits, interleaved


def _index(root: Path, **kwargs: object) -> tuple[list[str], dict]:
    return index_splits(str(root), None, None, None, kwargs.get("val_fraction", 0.2),  # type: ignore[arg-type]
                        None, 0)


@pytest.mark.parametrize(("train", "val"), [("Train", "Val"), ("TRAIN", "valid"), ("training", "Validation"),
                                            ("train", "dev")])
def test_split_folders_are_recognised_in_any_case_and_by_common_names(tmp_path: Path, train: str, val: str) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 3, "val": 2})
    (root / "train").rename(root / f"{train}_tmp")
    (root / f"{train}_tmp").rename(root / train)
    (root / "val").rename(root / f"{val}_tmp")
    (root / f"{val}_tmp").rename(root / val)
    names, splits = _index(root)
    assert names == ["blue", "green", "red"]  # not ['Train', 'Val']
    assert {s: len(v) for s, v in splits.items()} == {"train": 9, "val": 6}


def test_two_folders_for_one_split_are_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 3, "val": 2})
    shutil.copytree(root / "val", root / "Validation")
    with pytest.raises(ValueError, match=r"has 2 folders for the val split: \['Validation', 'val'\]; keep one"):
        _index(root)


def test_hidden_sub_folders_and_broken_links_are_left_out_and_counted(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 3, "val": 2})
    for junk in (".thumbnails", ".ipynb_checkpoints", "__MACOSX"):
        (root / "train" / "red" / junk).mkdir()
        shutil.copy(root / "train" / "blue" / "blue_0.png", root / "train" / "red" / junk / "x.png")  # a blue image
    os.symlink(tmp_path / "gone.png", root / "train" / "red" / "dangling.png")
    caplog.set_level(logging.INFO)
    _, splits = _index(root)
    assert len(splits["train"]) == 9 and not any("thumbnails" in p or "MACOSX" in p for p, _ in splits["train"])
    assert "skipped 1 broken symbolic link(s)" in caplog.text and "dangling.png" in caplog.text


def test_a_csv_with_a_byte_order_mark_loads_and_a_header_only_one_is_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 3, "val": 2})
    rows = [f"{p.relative_to(root)},{p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
    (root / "train.csv").write_text("\ufeffpath,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    data = ImageDataModule(train_csv=str(root / "train.csv"), num_workers=0)
    assert data.class_names == ["blue", "green", "red"]
    (root / "empty.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match=r"data\.train_csv='.*empty\.csv' has a header but no rows"):
        ImageDataModule(train_csv=str(root / "empty.csv"), num_workers=0)


def test_an_empty_validation_split_is_an_error_naming_the_counts(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 1})
    with pytest.raises(ValueError, match=r"the val split has no images \(images per split: \{'train': 3, 'val': 0\}\)"
                                         r"; with data\.val_fraction a class needs >= 2 images"):
        _index(root / "train")


def test_a_file_as_root_and_a_folder_of_other_files_say_what_they_are(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(NotADirectoryError, match=r"data\.root='.*labels\.csv' is a file, not a folder.*train_csv"):
        _index(tmp_path / "labels.csv")
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1})
    heic = root / "train" / "purple"
    heic.mkdir()
    for i in range(3):
        (heic / f"IMG_{i}.HEIC").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"\['purple'\] contain no images.*\(they hold 3 other file\(s\): "
                                         r"\{'\.heic': 3\}\)"):
        _index(root)


def test_validation_interleaves_the_classes() -> None:
    order = interleaved({"a": [Path("a0"), Path("a1"), Path("a2")], "b": [Path("b0")], "c": [Path("c0"), Path("c1")]})
    assert [str(f) for f, _ in order] == ["a0", "b0", "c0", "a1", "c1", "a2"]


def test_the_first_validation_batch_sees_every_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 3, "val": 4})
    data = ImageDataModule(root=str(root), batch_size=3, num_workers=0)
    assert [label for _, label in data.splits["val"][:3]] == [0, 1, 2]
    assert sorted(label for _, label in data.splits["train"][:3]) == [0, 0, 0]  # training is shuffled by the loader
