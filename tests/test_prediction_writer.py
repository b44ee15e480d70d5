"""CSVPredictionWriter (transfer_lit.callbacks.prediction_writer): one row per input with every class's probability,
and a failed predict leaves no header-only or truncated file behind."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone, make_image_folder
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from transfer_lit import CSVPredictionWriter, ImageDataModule, TransferModule

TESTS = Path(__file__).resolve().parent


class Named(Dataset):
    """``(image, name)`` pairs, as the image data module yields them for predict."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return torch.rand(3, 32, 32), f"img{i}.png"


class FailsAt(TransferModule):
    """Raises in ``predict_step`` at batch ``fail_at`` (a bug in research code, a dying disk...)."""

    fail_at = -1

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in predict_step")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def _predict(tmp_path: Path, fail_at: int) -> Path:
    output = tmp_path / "predictions.csv"
    model = FailsAt(TinyBackbone(), num_classes=3, class_names=["a", "b", "c"])
    model.fail_at = fail_at
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[CSVPredictionWriter(str(output))])
    trainer.predict(model, DataLoader(Named(), batch_size=2), return_predictions=False)
    return output


def test_rows_carry_every_class_probability(tmp_path: Path) -> None:
    with _predict(tmp_path, fail_at=-1).open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "prediction", "probability", "p_a", "p_b", "p_c"]
    assert [r[0] for r in rows[1:]] == [f"img{i}.png" for i in range(6)]
    for row in rows[1:]:
        every = [float(v) for v in row[3:]]
        assert abs(sum(every) - 1) < 1e-5 and float(row[2]) == max(every) and row[1] == "abc"[every.index(max(every))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no temporary file left


def test_a_failure_before_any_row_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "predictions.csv").write_text("earlier results\n")
    with pytest.raises(RuntimeError, match="boom in predict_step"):  # the user's bug keeps its traceback
        _predict(tmp_path, fail_at=0)
    assert (tmp_path / "predictions.csv").read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_a_failure_midway_keeps_the_rows_written_as_partial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        _predict(tmp_path, fail_at=2)
    assert not (tmp_path / "predictions.csv").exists()
    with (tmp_path / "predictions.partial.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == [f"img{i}.png" for i in range(4)]
    assert "predict stopped after 4 rows" in capsys.readouterr().err


class SignalsAt(TransferModule):
    """Sends this process ``signum`` in ``predict_step`` at batch 1, as ``kill`` / Ctrl-C would from outside."""

    signum = int(signal.SIGTERM)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if batch_idx == 1:
            os.kill(os.getpid(), self.signum)
        return super().predict_step(batch, batch_idx, dataloader_idx)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_predict_after_the_batch_and_keeps_its_rows(tmp_path: Path, signum: int, code: int,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "predictions.csv"
    model = SignalsAt(TinyBackbone(), num_classes=3, class_names=["a", "b", "c"])
    model.signum = int(signum)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[CSVPredictionWriter(str(output))])
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as stop:
        trainer.predict(model, DataLoader(Named(), batch_size=2), return_predictions=False)
    assert stop.value.code == code and signal.getsignal(signum) is before  # the handlers are put back
    with (tmp_path / "predictions.partial.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == ["img0.png", "img1.png", "img2.png", "img3.png"]  # the signalled batch too
    assert not output.exists()
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: predict stops after this batch" in err
    assert "predict stopped after 4 rows" in err


def test_sigterm_to_transfer_lit_predict_keeps_the_rows_and_exits_143(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", {"train": 3, "val": 2}, size=16)
    many = make_image_folder(tmp_path / "new", {"predict": 40}, size=16) / "predict"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "TRANSFER_LIT_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    common = ["--data.num_workers", "0", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path / "run")]
    cli = [sys.executable, "-m", "transfer_lit"]
    subprocess.run([*cli, "fit", "--data.root", str(images), "--model.backbone", "cli_tiny_backbone.TinyCLIBackbone",
                    "--trainer.max_epochs", "1", *common], env=env, check=True, capture_output=True)
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    output = tmp_path / "predictions.csv"
    log = tmp_path / "predict.log"
    process = subprocess.Popen([*cli, "predict", "--ckpt_path", str(checkpoint), "--data.predict_root", str(many),
                                "--model.backbone.init_args.delay", "0.3", "--prediction_writer.output", str(output),
                                *common], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any(len(p.read_text().splitlines()) > 1 for p in tmp_path.glob(".predictions.csv.*")):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143, log.read_text()[-3000:]
    with (tmp_path / "predictions.partial.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert 1 < len(rows) < 41 and rows[0][:3] == ["file", "prediction", "probability"]
    text = log.read_text()
    assert "Traceback" not in text and "SIGTERM: predict stops after this batch" in text and not output.exists()
    assert not list(tmp_path.glob(".predictions.csv.*"))  # no temporary file left


def test_a_folder_as_the_output_is_refused_before_predicting(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    model = TransferModule(TinyBackbone(), num_classes=3, class_names=["a", "b", "c"])
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[CSVPredictionWriter(str(folder))])
    with pytest.raises(ValueError, match=r"prediction_writer.output='.*results' is a folder; give a file name"):
        trainer.predict(model, DataLoader(Named(), batch_size=2), return_predictions=False)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def _predict_folder(tmp_path: Path, callbacks: list[Any]) -> Path:
    """``trainer.predict`` over a folder of 4 images, a text file, a broken link and an image that is no image."""
    folder = make_image_folder(tmp_path / "new", {"predict": 1}, size=16) / "predict"
    (folder / "blue" / "notes.txt").write_text("not an image")
    (folder / "green" / "broken.png").write_bytes(b"these are not pixels")
    (folder / "red" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    data = ImageDataModule(predict_root=str(folder), batch_size=2, num_workers=0, bad_images="skip")
    model = TransferModule(TinyBackbone(), num_classes=3, class_names=["a", "b", "c"])
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=callbacks)
    trainer.predict(model, datamodule=data, return_predictions=False)
    return folder


def test_the_inputs_predict_skips_are_counted_named_and_listed(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """They were left out without a word (no image extension) or in a warning (unreadable)."""
    output = tmp_path / "predictions.csv"
    folder = _predict_folder(tmp_path, [CSVPredictionWriter(str(output))])
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "skipped" in line]
    listing = tmp_path / "predictions.skipped.csv"
    assert lines == [f"transfer_lit: predict skipped 3 of 6 file(s) (broken symbolic link: 1; not an image (.txt): 1; "
                     f"unreadable image: 1): {folder}/blue/notes.txt, {folder}/green/broken.png, {folder}/red/gone.jpg"
                     f"; the full list is in {listing}"]
    with listing.open(newline="") as f:
        assert list(csv.reader(f)) == [["file", "reason"], [f"{folder}/blue/notes.txt", "not an image (.txt)"],
                                       [f"{folder}/green/broken.png", "unreadable image"],
                                       [f"{folder}/red/gone.jpg", "broken symbolic link"]]
    with output.open(newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 3

    for bad in ("blue/notes.txt", "green/broken.png", "red/gone.jpg"):  # nothing skipped: no line, no stale list
        (folder / bad).unlink()
    data = ImageDataModule(predict_root=str(folder), batch_size=2, num_workers=0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[CSVPredictionWriter(str(output))])
    trainer.predict(TransferModule(TinyBackbone(), num_classes=3), datamodule=data, return_predictions=False)
    assert "skipped" not in capsys.readouterr().err and not listing.exists()


def test_without_the_writer_the_data_module_says_what_predict_skipped(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = _predict_folder(tmp_path, [])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert line.startswith("transfer_lit: predict skipped 3 of 6 file(s) (") and f"{folder}/red/gone.jpg" in line
