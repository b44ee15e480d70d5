"""Bad input, end to end through the CLI: one clear message (key or file, value, what is valid), exit 2.

The DataModule-level errors are unit-tested in test_images.py, unknown backbone / weights names and a zero
batch size in test_cli.py; here each item of the bad-input list runs through ``transfer-lit`` itself.
"""

from __future__ import annotations

import io
import logging
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_tiny_backbone import OtherCLIBackbone
from conftest import make_image_folder
from lightning.pytorch import Trainer
from PIL import Image

from transfer_lit import ImageDataModule, TransferModule
from transfer_lit.cli import main
from transfer_lit.errors import user_error_message

pytestmark = pytest.mark.filterwarnings("ignore")

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


def fit_args(root: Path | str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", "--data.root", str(root), "--data.batch_size", "4", "--data.num_workers", "0",
        "--model.backbone", "cli_tiny_backbone.TinyCLIBackbone", "--trainer.max_epochs", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run_dir),
        *extra,
    ]


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; it must exit with 2 and print one error paragraph, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    message = err[err.index("transfer-lit: error: ") :].removeprefix("transfer-lit: error: ")
    return message.removesuffix("(run with --debug for the full traceback)\n").strip()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", {"train": 4, "val": 2}, size=16)


def truncated_jpeg(path: Path) -> Path:
    rng = random.Random(0)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), rng.randbytes(64 * 64 * 3)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


# ----------------------------------------------------------------- images


def test_truncated_jpeg_read_in_a_loader_worker_names_the_file(images: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = truncated_jpeg(images / "train" / "red" / "half.jpg")
    message = cli_error(fit_args(images, tmp_path, "--data.num_workers", "1"), capsys)
    assert message.startswith(f"cannot read image '{bad}': ") and "truncated" in message
    assert "\n" not in message  # the worker's traceback is not shown


def test_non_image_with_image_extension_names_the_file(images: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = images / "val" / "blue" / "notes.png"
    bad.write_text("these are not pixels")
    message = cli_error(fit_args(images, tmp_path), capsys)
    assert message == f"cannot read image '{bad}': not an image file (Pillow cannot identify its format)"


def test_skip_leaves_bad_files_out_and_reports_them_at_the_end(images: Path, tmp_path: Path) -> None:
    truncated_jpeg(images / "train" / "red" / "half.jpg")
    (images / "train" / "green" / "notes.jpg").write_text("x")
    (images / "val" / "blue" / "notes.png").write_text("x")
    with pytest.warns(UserWarning, match=r"left out 3 unreadable image\(s\) during fit \{'train': 2, 'val': 1\}"):
        main(fit_args(images, tmp_path, "--data.bad_images", "skip", "--data.num_workers", "1",
                      "--data.batch_size", "1"))  # batches of one: a batch holding only a bad file is skipped too
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()


def test_scan_lists_every_bad_file_before_training(images: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    half = truncated_jpeg(images / "train" / "red" / "half.jpg")
    notes = images / "val" / "blue" / "notes.png"
    notes.write_text("x")
    message = cli_error(fit_args(images, tmp_path, "--data.scan", "true"), capsys)
    assert "2 unreadable image(s) (data.bad_images='error'; use 'skip' to leave them out)" in message
    assert str(half) in message and str(notes) in message


def test_unusual_but_readable_images_train(tmp_path: Path) -> None:
    """Grayscale, alpha, palette, CMYK, 16-bit, EXIF-rotated and large files go through a whole fit."""
    root = make_image_folder(tmp_path / "images", {"train": 2, "val": 1}, size=16)
    folder = root / "train" / "red"
    Image.new("L", (20, 30), 80).save(folder / "gray.png")
    Image.new("LA", (20, 20), (80, 0)).save(folder / "gray_alpha.png")
    Image.new("RGBA", (20, 20), (200, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("P", (20, 20), 3).save(folder / "palette.png", transparency=3)
    Image.new("CMYK", (20, 20), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (20, 20), 40000).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (30, 20), (200, 0, 0)).save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (3000, 2000), (200, 0, 0)).save(folder / "large.jpg")
    main(fit_args(root, tmp_path))
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()


def test_gif_is_ignored_like_imagefolder_and_counted(images: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("P", (8, 8)).save(images / "train" / "red" / "anim.gif")
    caplog.set_level(logging.INFO)
    data = ImageDataModule(root=str(images), num_workers=0)
    assert len(data.splits["train"]) == 12
    assert re.search(r"ignored 1 file\(s\) whose extension is not in .*\{'\.gif': 1\}", caplog.text)


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} absent")
def test_the_real_hymenoptera_gif_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ImageDataModule(root=str(HYMENOPTERA), num_workers=0)
    assert "{'.gif': 1}" in caplog.text and "imageNotFound.gif" in caplog.text


# ----------------------------------------------------------------- folders and CSV files


def _without_train(root: Path) -> None:
    shutil.rmtree(root / "train")


def _empty_class(root: Path) -> None:
    for file in (root / "train" / "blue").iterdir():
        file.unlink()


def _class_only_in_val(root: Path) -> None:
    shutil.copytree(root / "val" / "red", root / "val" / "purple")


FOLDER_CASES = {
    "missing root": (None, [], r"data\.root='.*/nowhere': no such directory"),
    "missing train/": (_without_train, [], r"data\.root='.*' has val/ or test/ but no train/ folder"),
    "empty class folder": (_empty_class, [], r"data\.root \(train/\)='.*/train': class folder\(s\) \['blue'\] "
                                             r"contain no images with extensions"),
    "class only in val": (_class_only_in_val, [], r"data: classes \['purple'\] appear in val but not in train; "
                                                  r"train classes are \['blue', 'green', 'red'\]"),
    "samples_per_class": (None, ["--data.samples_per_class", "5"], r"data\.samples_per_class=5 but these classes have "
                                                                   r"fewer training images: \{'blue': 4, 'green': 4"),
}


@pytest.mark.parametrize("case", FOLDER_CASES, ids=list(FOLDER_CASES))
def test_folder_errors(case: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    change, extra, expected = FOLDER_CASES[case]
    root = tmp_path / "nowhere" if case == "missing root" else images
    if change is not None:
        change(images)
    assert re.fullmatch(expected + ".*", cli_error(fit_args(root, tmp_path, *extra), capsys), re.DOTALL)


@pytest.mark.parametrize("problem", ["unknown path", "unknown label"])
def test_csv_errors(problem: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def write(name: str, rows: list[tuple[str, str]]) -> Path:
        path = images / name
        path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
        return path

    train = write("train.csv", [(str(p.relative_to(images)), p.parent.name) for p in (images / "train").rglob("*.png")])
    val_rows = [(str(p.relative_to(images)), p.parent.name) for p in (images / "val").rglob("*.png")]
    if problem == "unknown path":
        val_rows.append(("val/red/missing.png", "red"))
    else:  # another image (one path with two labels is an error of its own)
        shutil.copyfile(images / val_rows[0][0], images / "val" / "extra.png")
        val_rows.append(("val/extra.png", "purple"))
    val = write("val.csv", val_rows)
    args = fit_args(images, tmp_path)
    args[args.index("--data.root") : args.index("--data.root") + 2] = ["--data.train_csv", str(train),
                                                                         "--data.val_csv", str(val)]
    message = cli_error(args, capsys)
    if problem == "unknown path":
        assert message.startswith(f"data.val_csv='{val}' lists 1 file(s) that do not exist, e.g. ['")
        assert "missing.png" in message
    else:
        assert message.startswith("data: classes ['purple'] appear in val but not in train")


# ----------------------------------------------------------------- configuration


@pytest.mark.parametrize("lr", ["0", "-0.001"])
def test_learning_rate_not_positive(lr: str, images: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    message = cli_error(fit_args(images, tmp_path, "--model.lr", lr), capsys)
    assert message == f"model.lr must be positive, got {float(lr)}"


def test_schedule_naming_unknown_blocks(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = fit_args(images, tmp_path, "--model.mode", "progressive",
                    "--trainer.callbacks+=transfer_lit.ProgressiveUnfreezing",
                    "--trainer.callbacks.schedule", "{1: [layer4]}")
    message = cli_error(args, capsys)
    assert "unknown block 'layer4'" in message and "['stem', 'block1']" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_gpu(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "gpu" in cli_error(fit_args(images, tmp_path, "--trainer.accelerator", "gpu"), capsys)


@pytest.mark.parametrize("switch", ["--trainer.logger=false", "--trainer.enable_checkpointing=false"])
def test_switching_off_what_a_default_callback_needs_is_not_an_error(switch: str, images: Path,
                                                                      tmp_path: Path) -> None:
    main([*fit_args(images, tmp_path), switch])


# ----------------------------------------------------------------- checkpoints that do not fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch run on three classes: its image folder and its run folder (with last.ckpt)."""
    base = tmp_path_factory.mktemp("trained")
    images = make_image_folder(base / "images", {"train": 4, "val": 2, "test": 2}, size=16)
    main(fit_args(images, base / "run"))
    return images, base / "run"


def _test_args(root: Path, checkpoint: Path, tmp_path: Path) -> list[str]:
    args = fit_args(root, tmp_path, "--ckpt_path", str(checkpoint))
    return ["test", *args[1:]]


def test_checkpoint_with_another_class_count(trained: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    images, run = trained
    two = shutil.copytree(images, tmp_path / "two")
    for split in ("train", "val", "test"):
        shutil.rmtree(two / split / "blue")
    message = cli_error(_test_args(two, next(run.rglob("last.ckpt")), tmp_path), capsys)
    assert message == ("the checkpoint was trained for model.num_classes=3 (classes ['blue', 'green', 'red']) but "
                       "this run has model.num_classes=2 (classes ['green', 'red'], from the data); use data with the "
                       "checkpoint's 3 classes")


def test_checkpoint_with_other_class_names(trained: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    images, run = trained
    renamed = shutil.copytree(images, tmp_path / "renamed")
    for split in ("train", "val", "test"):
        (renamed / split / "red").rename(renamed / split / "rose")
    message = cli_error(_test_args(renamed, next(run.rglob("last.ckpt")), tmp_path), capsys)
    assert message.startswith("the checkpoint's classes ['blue', 'green', 'red'] differ from this run's "
                              "model.class_names ['blue', 'green', 'rose']")


@pytest.mark.parametrize("change", ["backbone", "width", "head"])
def test_resuming_with_another_backbone_or_head(change: str, trained: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # With a checkpoint *file*, LightningCLI rebuilds the model from the checkpoint's own hyperparameters;
    # with `--ckpt_path last` the command line's model is used, and may not fit.
    images, run = trained
    flags = {"backbone": ["--model.backbone", "cli_tiny_backbone.OtherCLIBackbone"],
             "width": ["--model.backbone.width", "8"], "head": ["--model.head", "transfer_lit.MLPHead"]}[change]
    args = fit_args(images, run, "--trainer.max_epochs", "2", "--ckpt_path", "last", *flags)
    message = cli_error(args, capsys)
    if change == "head":
        assert message.startswith("the checkpoint's head does not fit: it was trained with "
                                  "model.head=transfer_lit.LinearHead(dropout=0.0), this run has model.head="
                                  "transfer_lit.MLPHead(")
    else:
        assert message.startswith("the checkpoint holds another backbone: it was trained with model.backbone="
                                  "cli_tiny_backbone.TinyCLIBackbone(width=4, delay=0.0), this run has model.backbone=")
        assert "Set model.backbone as in the run that wrote it" in message


@pytest.mark.parametrize("command", ["validate", "test", "fit"])
def test_an_explicit_backbone_unlike_the_checkpoint_files_is_refused(command: str, trained: tuple[Path, Path],
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A checkpoint *file* puts its own model first on the command line; an explicit --model.backbone after it wins
    # and must not be silently swapped for the checkpoint's, nor load the checkpoint's tensors into the wrong one.
    images, run = trained
    checkpoint = next(run.rglob("last.ckpt"))
    args = fit_args(images, tmp_path, "--ckpt_path", str(checkpoint), "--model.backbone",
                    "cli_tiny_backbone.OtherCLIBackbone", "--trainer.max_epochs", "2")
    message = cli_error([command, *args[1:]], capsys)
    assert message.startswith("the checkpoint holds another backbone: it was trained with model.backbone="
                              "cli_tiny_backbone.TinyCLIBackbone(width=4, delay=0.0), this run has model.backbone="
                              "cli_tiny_backbone.OtherCLIBackbone")


def test_python_api_gets_the_same_message_instead_of_a_key_dump(trained: tuple[Path, Path]) -> None:
    images, run = trained
    model = TransferModule(OtherCLIBackbone(), num_classes=3)
    data = ImageDataModule(root=str(images), num_workers=0)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"^the checkpoint holds another backbone: .* this run has "
                                         r"model.backbone=OtherCLIBackbone; 11 of 11 backbone tensors differ"):
        trainer.test(model, data, ckpt_path=next(run.rglob("last.ckpt")))


# ----------------------------------------------------------------- training


def test_loss_blowing_up_names_the_step_and_the_group(images: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    message = cli_error(fit_args(images, tmp_path, "--model.lr", "1e30"), capsys)
    assert message.startswith("training loss is nan at global step 1 (epoch 0): inputs and weights are finite but "
                              "the forward pass overflowed")
    assert "of group 'head' (lr 1e+30); lower model.lr" in message


def test_a_data_batch_producing_inf_is_named_as_such(images: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    message = cli_error(fit_args(images, tmp_path, "--model.preprocessing", "{std: [1e-45, 1e-45, 1e-45]}"), capsys)
    assert message.startswith("training loss is nan at global step 0 (epoch 0): the input batch holds ")
    assert "check the data and the preprocessing" in message


def test_a_bug_in_user_code_keeps_its_traceback(images: Path, tmp_path: Path) -> None:
    """A ValueError raised in the user's own backbone is not about their input: it is not a one-line user error."""
    args = fit_args(images, tmp_path / "run")
    args[args.index("cli_tiny_backbone.TinyCLIBackbone")] = "cli_tiny_backbone.BuggyCLIBackbone"
    with pytest.raises(ValueError, match=r"too many values to unpack") as raised:
        main(args)
    assert raised.traceback[-1].path.name == "cli_tiny_backbone.py"  # where the bug is
    assert user_error_message(raised.value) is None


def test_errors_raised_by_transfer_lit_and_lightning_stay_user_errors(images: Path) -> None:
    from transfer_lit import ImageDataModule

    with pytest.raises(ValueError) as ours:
        ImageDataModule(root=str(images), batch_size=0)
    assert user_error_message(ours.value) == "data.batch_size must be a positive integer, got 0"
    assert user_error_message(ValueError("not raised anywhere")) is None  # no traceback: nobody's input


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


@pytest.fixture
def broken_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(3)}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "objects.pth"
    torch.save({"w": _Payload()}, pickled)
    return {"truncated": truncated, "pickled": pickled}


def test_a_truncated_or_object_holding_weights_file_is_named_and_nothing_runs(
        broken_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from transfer_lit import TorchvisionBackbone

    with pytest.raises(ValueError, match=r"model\.backbone\.weights='.*truncated\.ckpt' is not a readable torch file "
                                         r"\([\d,]+ bytes\): truncated"):
        TorchvisionBackbone("resnet18", weights=str(broken_files["truncated"]))
    with pytest.raises(ValueError, match=r"objects\.pth' was refused: it holds pickled Python objects.*nothing in it "
                                         r"was executed"):
        TorchvisionBackbone("resnet18", weights=str(broken_files["pickled"]))
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["test", "predict", "fit"])
def test_a_truncated_checkpoint_gets_one_clear_message(command: str, broken_files: dict[str, Path], images: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = fit_args(images, tmp_path / "run", "--ckpt_path", str(broken_files["truncated"]))
    args[0] = command
    if command == "predict":
        args = [command, "--ckpt_path", str(broken_files["truncated"]), "--data.predict_root", str(images)]
    message = cli_error(args, capsys)
    assert "--ckpt_path=" in message and "truncated.ckpt' is not a readable torch file" in message
