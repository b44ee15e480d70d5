"""Splits that cannot score the model on its own training images: a held-out split (data.test_fraction /
data.val_fraction) evaluated from a checkpoint must be the one its fit held out; CSV labels are cleaned and checked."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from test_errors import cli_error, fit_args

from transfer_lit import ImageDataModule
from transfer_lit.cli import main

# ----------------------------------------------------------------- held-out splits tied to the checkpoint


@pytest.fixture(scope="module")
def carved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch fit on a flat class folder with half of it held out as the test split: (folder, last.ckpt)."""
    base = tmp_path_factory.mktemp("carved")
    flat = make_image_folder(base, {"flat": 6}, size=16) / "flat"
    main(fit_args(flat, base / "run", "--data.test_fraction", "0.5"))
    return flat, next((base / "run").rglob("last.ckpt"))


def _evaluate(command: str, root: Path, checkpoint: Path, run: Path, *extra: str) -> list[str]:
    return [command, *fit_args(root, run, "--ckpt_path", str(checkpoint), *extra)[1:]]


def test_the_checkpoint_records_what_its_fit_held_out(carved: tuple[Path, Path]) -> None:
    record = torch.load(carved[1], map_location="cpu", weights_only=False)["ImageDataModule"]["held_out"]
    assert {k: record[k] for k in ("seed", "val_fraction", "test_fraction", "carved")} == {
        "seed": 0, "val_fraction": 0.2, "test_fraction": 0.5, "carved": ["test", "val"]}
    assert sorted(record["sha256"]) == ["test", "train", "val"]


def test_testing_on_the_held_out_split_of_the_fit_runs(carved: tuple[Path, Path], tmp_path: Path) -> None:
    flat, checkpoint = carved
    main(_evaluate("test", flat, checkpoint, tmp_path, "--data.test_fraction", "0.5"))  # as fit did: no error


@pytest.mark.parametrize("change", ["seed", "test_fraction", "added_image"])
def test_testing_another_held_out_split_than_the_fit_s_is_refused(change: str, carved: tuple[Path, Path],
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    flat, checkpoint = carved
    extra = {"seed": ["--data.test_fraction", "0.5", "--data.seed", "7"], "test_fraction": ["--data.test_fraction",
             "0.3"], "added_image": ["--data.test_fraction", "0.5"]}[change]
    if change == "added_image":
        flat = shutil.copytree(flat, tmp_path / "flat")
        shutil.copy(flat / "red" / "red_0.png", flat / "red" / "red_new.png")
    message = cli_error(_evaluate("test", flat, checkpoint, tmp_path / "run", *extra), capsys)
    assert message.startswith("data: the test split held out of data.root is not the one the checkpoint's fit "
                              "held out: ")
    assert "its images may have been trained on" in message and "data.test_csv" in message
    if change == "seed":
        assert "data.seed=0, data.test_fraction=0.5, data.val_fraction=0.2, this run with data.seed=7" in message
    elif change == "test_fraction":
        assert "this run with data.seed=0, data.test_fraction=0.3, data.val_fraction=0.2" in message
    else:
        assert "the files under data.root changed since its fit" in message


def test_validating_another_held_out_split_is_refused(carved: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    flat, checkpoint = carved
    args = _evaluate("validate", flat, checkpoint, tmp_path, "--data.test_fraction", "0.5",
                     "--data.val_fraction", "0.4")
    message = cli_error(args, capsys)
    assert message.startswith("data: the val split held out of data.root is not the one the checkpoint's fit")
    assert "data.val_fraction=0.4" in message and "data.val_csv" in message


def test_testing_a_split_the_fit_trained_on_is_refused(carved: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 4, "val": 2}, size=16)
    main(fit_args(root, tmp_path / "run"))  # trains on all of train/
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    message = cli_error(_evaluate("test", root, checkpoint, tmp_path / "run2", "--data.test_fraction", "0.5"), capsys)
    assert "the checkpoint's fit held no test split out of its training data" in message


def test_a_checkpoint_without_the_record_is_not_checked(carved: tuple[Path, Path], tmp_path: Path) -> None:
    flat, checkpoint = carved
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state.pop("ImageDataModule", None)  # as checkpoints written before the record
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    main(_evaluate("test", flat, old, tmp_path, "--data.seed", "7", "--data.test_fraction", "0.5"))


# ----------------------------------------------------------------- CSV labels


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    make_image_folder(tmp_path, {"img": 2}, size=8)
    path = tmp_path / "train.csv"
    path.write_text("path,label\n" + "".join(f"{row}\n" for row in rows))
    return path


def test_csv_labels_and_paths_are_stripped(tmp_path: Path) -> None:
    csv = _csv(tmp_path, ["img/red/red_0.png,red ", " img/red/red_1.png , red", "img/blue/blue_0.png,blue",
                          "img/blue/blue_1.png,  blue"])
    data = ImageDataModule(train_csv=str(csv), val_fraction=0.5)
    assert data.class_names == ["blue", "red"]


def test_an_empty_csv_label_is_refused_with_its_lines(tmp_path: Path) -> None:
    csv = _csv(tmp_path, ["img/red/red_0.png,red", "img/red/red_1.png,", "img/blue/blue_0.png,  "])
    with pytest.raises(ValueError, match=r"^data: 2 train row\(s\) of data.train_csv have an empty or "
                                         r"whitespace-only label: .*train.csv:3, .*train.csv:4$"):
        ImageDataModule(train_csv=str(csv))


def test_one_path_with_two_csv_labels_is_refused(tmp_path: Path) -> None:
    csv = _csv(tmp_path, ["img/red/red_0.png,red", "img/red/red_1.png,red", "img/red/red_0.png,blue"])
    with pytest.raises(ValueError, match=r"lists 'img/red/red_0.png' with two labels: 'red' \(.*train.csv:2\) and "
                                         r"'blue' \(.*train.csv:4\); give each image one label"):
        ImageDataModule(train_csv=str(csv))


def test_an_exact_duplicate_csv_row_is_used_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    csv = _csv(tmp_path, ["img/red/red_0.png,red", "img/red/red_1.png,red", "img/red/red_0.png,red",
                          "img/blue/blue_0.png,blue", "img/blue/blue_1.png,blue"])
    data = ImageDataModule(train_csv=str(csv), val_fraction=0.5)
    assert sum(len(v) for v in data.splits.values()) == 4
    assert "repeats 1 row(s) (same path and label), each used once" in caplog.text and "train.csv:4" in caplog.text
