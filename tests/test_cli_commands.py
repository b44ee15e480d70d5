"""What each command needs: ``validate`` / ``test`` / ``predict`` only the data they evaluate (the classes are the
checkpoint's), ``test`` the split ``fit`` held out (``data.test_fraction``), and a resumed ``fit`` its own run folder
(one ``metrics.csv``, the best checkpoint still tracked), compared with the uninterrupted run."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import COLORS, make_image_folder
from test_errors import cli_error

from transfer_lit import ImageDataModule
from transfer_lit.cli import main
from transfer_lit.data.splits import scan_class_folders, stratified_split

pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"), pytest.mark.usefixtures("one_thread")]

CLASSES = sorted(COLORS)


def common(run_dir: Path, *extra: str) -> list[str]:
    """Options of every command here: the tiny backbone, CPU, no progress bar, runs under ``run_dir``."""
    return ["--model.backbone", "cli_tiny_backbone.TinyCLIBackbone", "--data.batch_size", "4",
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(run_dir), *extra]


def fit(root: Path, run_dir: Path, epochs: int, *extra: str) -> None:
    main(["fit", "--data.root", str(root), "--trainer.max_epochs", str(epochs), *common(run_dir, *extra)])


def write_csv(path: Path, rows: list[tuple[Path, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((str(p), label) for p, label in rows)
    return path


def labelled(folder: Path) -> list[tuple[Path, str]]:
    """``(image, class)`` of ``folder/<class>/*.png``."""
    return [(p, p.parent.name) for p in sorted(folder.rglob("*.png"))]


def report_support(out: str) -> dict[str, int]:
    """``{class: support}`` of the per-class table ``test`` prints."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["class", "precision", "recall", "f1",
                                                                            "support"])
    rows = [line.split() for line in lines[header + 1:header + 1 + len(CLASSES)]]
    return {row[0]: int(row[4]) for row in rows}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train and val folders, no test folder: 4 + 2 images of each class (3 training steps per epoch)."""
    return make_image_folder(tmp_path_factory.mktemp("commands") / "images", {"train": 4, "val": 2}, size=16)


@pytest.fixture(scope="module")
def other_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of the same classes outside the training folder: 2 per class."""
    return make_image_folder(tmp_path_factory.mktemp("other") / "more", {"held": 2}, size=16, seed=1) / "held"


@pytest.fixture(scope="module")
def checkpoint(images: Path) -> Path:
    run_dir = images.parent / "runs"
    fit(images, run_dir, 1)
    (last,) = run_dir.rglob("last.ckpt")
    return last


# ----------------------------------------------------------------- evaluation commands read only their own data


def test_a_test_csv_gives_the_test_split_even_with_a_root(images: Path, other_images: Path, tmp_path: Path,
                                                          checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was ignored whenever data.root was set: "no test data"."""
    table = write_csv(tmp_path / "test.csv", labelled(other_images))
    data = ImageDataModule(root=str(images), test_csv=str(table), num_workers=0)
    assert sorted(p for p, _ in data.splits["test"]) == sorted(str(p) for p, _ in labelled(other_images))
    assert data.class_names == CLASSES and len(data.splits["train"]) == 12  # the rest still comes from data.root
    capsys.readouterr()
    main(["test", "--data.root", str(images), "--data.test_csv", str(table), "--ckpt_path", str(checkpoint),
          *common(tmp_path / "runs")])
    assert report_support(capsys.readouterr().out) == dict.fromkeys(CLASSES, 2)


@pytest.mark.parametrize("command", ["test", "validate"])
def test_a_checkpoint_and_the_evaluated_csv_are_enough(command: str, other_images: Path, tmp_path: Path,
                                                       checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No recipe, no training data: the classes are the checkpoint's (it demanded data.root or data.train_csv)."""
    split = "val" if command == "validate" else "test"
    rows = labelled(other_images)
    table = write_csv(tmp_path / f"{split}.csv", [r for r in rows if r[1] != "green"])  # a class may be absent
    capsys.readouterr()
    main([command, "--ckpt_path", str(checkpoint), f"--data.{split}_csv", str(table), "--data.num_workers", "0",
          "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"),
          "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert f"{split}_acc" in out
    if command == "test":  # numbered by the checkpoint's classes: blue and red keep their indices
        assert report_support(out) == {"blue": 2, "green": 0, "red": 2}


def test_predict_with_a_recipe_whose_training_folder_is_gone(checkpoint: Path, other_images: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"backbone": {"class_path": "cli_tiny_backbone.TinyCLIBackbone"}},
        "data": {"root": str(tmp_path / "deleted_training_folder"), "batch_size": 4, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "default_root_dir": str(tmp_path / "runs")}}))
    output = tmp_path / "predictions.csv"
    capsys.readouterr()
    main(["predict", "--config", str(recipe), "--ckpt_path", str(checkpoint), "--data.predict_root", str(other_images),
          "--prediction_writer.output", str(output)])
    assert "predict reads only its own data, with the model's classes: data.root left out" in capsys.readouterr().err
    with output.open() as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 6 and {r["prediction"] for r in predictions} <= set(CLASSES)


def test_evaluation_commands_leave_the_working_directory_alone(checkpoint: Path, other_images: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Without trainer.default_root_dir each left lightning_logs/version_N/ (config.yaml, hparams.yaml) there: predict
    writes only its predictions now, validate / test log beside the version folder that trained the checkpoint."""
    runs = tmp_path / "run" / "lightning_logs"
    shutil.copytree(checkpoint.parents[1], runs / "version_0")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    options = ["--ckpt_path", str(runs / "version_0" / "checkpoints" / checkpoint.name), "--data.num_workers", "0",
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    main(["predict", "--data.predict_root", str(other_images), *options])
    assert [p.name for p in cwd.iterdir()] == ["predictions.csv"]
    table = write_csv(tmp_path / "held.csv", labelled(other_images))
    main(["validate", "--data.val_csv", str(table), *options])
    main(["test", "--data.test_csv", str(table), *options])
    assert [p.name for p in cwd.iterdir()] == ["predictions.csv"]
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1", "version_2"]
    assert "test_acc" in (runs / "version_2" / "metrics.csv").read_text()
    assert (runs / "version_2" / "config.yaml").is_file()


def test_a_class_the_checkpoint_does_not_know_is_named_with_the_checkpoints_classes(
        checkpoint: Path, other_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    purple = tmp_path / "purple.png"
    shutil.copy(labelled(other_images)[0][0], purple)
    table = write_csv(tmp_path / "test.csv", [*labelled(other_images), (purple, "purple")])
    message = cli_error(["test", "--ckpt_path", str(checkpoint), "--data.test_csv", str(table), "--data.num_workers",
                         "0", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert "the test split has classes ['purple'] that the model does not know" in message
    assert str(CLASSES) in message


def test_without_training_data_or_a_checkpoint_the_classes_are_asked_for(
        other_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = write_csv(tmp_path / "test.csv", labelled(other_images))
    message = cli_error(["test", "--data.test_csv", str(table), *common(tmp_path)], capsys)
    assert "no training split to take the classes from" in message and "--ckpt_path" in message


def test_text_data_without_a_training_file_takes_the_models_classes(text_model: Path, tmp_path: Path) -> None:
    from conftest import make_sentiment_rows, write_tsv
    from lightning.pytorch import Trainer

    from transfer_lit import HFTextBackbone, TextDataModule, TransferModule

    rows = make_sentiment_rows(12)
    data = TextDataModule(test_csv=str(write_tsv(tmp_path / "test.tsv", rows)))
    assert data.class_names == []  # nothing to read them from yet
    model = TransferModule(HFTextBackbone(str(text_model)), num_classes=3, class_names=["neg", "neutral", "pos"])
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    trainer.test(model, datamodule=data)
    assert data.class_names == ["neg", "neutral", "pos"]
    assert sorted({label for _, label in data.splits["test"]}) == [0, 2]  # pos is 2 for the model, not 1


# ----------------------------------------------------------------- test evaluates the split fit held out


def test_test_fraction_holds_out_a_test_split_that_fit_never_sees_and_test_evaluates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = make_image_folder(tmp_path, {"pool": 8}, size=16) / "pool"  # class folders directly: no test/ folder
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"backbone": {"class_path": "cli_tiny_backbone.TinyCLIBackbone"}},
        "data": {"root": str(pool), "val_fraction": 0.25, "test_fraction": 0.25, "batch_size": 4, "num_workers": 0},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "runs")}}))
    main(["fit", "--config", str(recipe)])
    capsys.readouterr()
    main(["test", "--config", str(recipe), "--ckpt_path", "last"])
    support = report_support(capsys.readouterr().out)

    data = ImageDataModule(root=str(pool), val_fraction=0.25, test_fraction=0.25)
    files = {split: {p for p, _ in samples} for split, samples in data.splits.items()}
    assert {split: len(f) for split, f in files.items()} == {"train": 12, "val": 6, "test": 6}
    assert not files["test"] & (files["train"] | files["val"])  # fit never trains or validates on it
    assert files["test"] | files["train"] | files["val"] == {str(p) for p, _ in labelled(pool)}
    assert support == data.class_counts("test") == dict.fromkeys(CLASSES, 2)  # test evaluated exactly that split
    again = ImageDataModule(root=str(pool), val_fraction=0.25, test_fraction=0.25)
    assert again.splits == data.splits  # seeded: the same split in every run
    # Without a test_fraction the validation split is the one it always was (a checkpoint's val split stays valid).
    _, held = stratified_split(scan_class_folders(pool, "data.root"), 0.25, 0)
    unchanged = ImageDataModule(root=str(pool), val_fraction=0.25)
    assert {p for p, _ in unchanged.splits["val"]} == {str(f) for files in held.values() for f in files}


def test_test_fraction_with_a_test_folder_is_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"train": 3, "val": 1, "test": 1}, size=8)
    with pytest.raises(ValueError, match=r"data\.test_fraction=0\.2 holds a test split out of the training data, but "
                                         r"the data has a test split of its own"):
        ImageDataModule(root=str(root), test_fraction=0.2)
    with pytest.raises(ValueError, match=r"data\.val_fraction \+ data\.test_fraction < 1"):
        ImageDataModule(root=str(root), val_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------- a resumed fit continues its own run folder


def metrics(run_dir: Path) -> list[dict[str, str]]:
    (only,) = (run_dir / "lightning_logs").iterdir()
    with (only / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def best_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("best-*.ckpt"))


def test_a_resumed_fit_continues_its_version_folder_and_learning_curve(images: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    straight, run = tmp_path / "straight", tmp_path / "resumed"
    fit(images, straight, 3)
    fit(images, run, 1)
    folder = run / "lightning_logs" / "version_0" / "checkpoints"
    shutil.copy(folder / "last.ckpt", folder / "epoch0.ckpt")
    capsys.readouterr()
    fit(images, run, 3, "--ckpt_path", "last")
    assert [p.name for p in (run / "lightning_logs").iterdir()] == ["version_0"]  # not a version_1 beside it
    assert f"resuming in {folder.parent}" in capsys.readouterr().err
    assert metrics(run) == metrics(straight)  # one learning curve, each step once, as if never stopped
    assert best_checkpoints(run) == best_checkpoints(straight)  # ModelCheckpoint kept tracking the best
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 9

    # From a checkpoint older than the run's end: the rows logged after it are the resumed run's to log again.
    fit(images, run, 3, "--ckpt_path", str(folder / "epoch0.ckpt"))
    # 2 epochs of 6 rows: the learning rates, 3 steps, validation, the training epoch
    assert "from step 3 (12 later rows of metrics.csv dropped)" in capsys.readouterr().err
    assert metrics(run) == metrics(straight)


def test_a_resumed_fit_continues_its_tensorboard_folder(images: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = ("--trainer.logger", "TensorBoardLogger")
    fit(images, tmp_path, 1, *tensorboard)
    folder = tmp_path / "lightning_logs" / "version_0"
    shutil.copy(folder / "checkpoints" / "last.ckpt", folder / "checkpoints" / "epoch0.ckpt")
    fit(images, tmp_path, 2, *tensorboard, "--ckpt_path", "last")
    fit(images, tmp_path, 2, *tensorboard, "--ckpt_path", str(folder / "checkpoints" / "epoch0.ckpt"))
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    events = EventAccumulator(str(folder))
    events.Reload()
    steps = [e.step for e in events.Scalars("train_loss_step")]
    assert steps == list(range(6))  # each step once: the events after the older checkpoint are purged
    assert [e.step for e in events.Scalars("val_acc")] == [2, 5]
