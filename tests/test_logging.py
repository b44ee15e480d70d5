"""Logging: TensorBoard from the command line, the two learning-rate columns, a missing tensorboard in one line."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone, make_image_folder
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from test_progressive import GateRecorder
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import ProgressiveUnfreezing, TransferModule
from transfer_lit.callbacks import LearningRates
from transfer_lit.cli import build_cli, main
from transfer_lit.loggers import DEFAULT_ROOT_DIR, with_logger_save_dir

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("logging") / "images", {"train": 8, "val": 4, "test": 4})


def lr_rows(metrics_csv: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header of a CSVLogger's metrics.csv and its rows that hold learning rates."""
    with metrics_csv.open() as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row.get("lr-head")]
    return list(reader.fieldnames or []), rows


# ---------------------------------------------------------------------------------------------- TensorBoard


@pytest.mark.parametrize("form", ["short", "class_path_and_save_dir"])
def test_tensorboard_logger_from_the_cli_writes_events_with_the_lr_columns(form: str, images: Path,
                                                                          tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, save_dir = tmp_path / "root", tmp_path / "tb"
    logger = (["--trainer.logger", "TensorBoardLogger"] if form == "short" else
              ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir",
               str(save_dir)])
    main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--trainer.default_root_dir", str(root),
          *logger])  # returns: exit status 0
    # Without a save_dir it writes where Lightning's default logger would: under trainer.default_root_dir.
    (events,) = ((root if form == "short" else save_dir) / "lightning_logs" / "version_0").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"lr-head", "lr-backbone", "val_acc", "train_loss_epoch"} <= scalars
    assert not any(tag.startswith("lr-AdamW") for tag in scalars)
    assert (events.parent / "checkpoints" / "last.ckpt").is_file()


def test_a_logger_save_dir_given_on_the_command_line_wins() -> None:
    assert with_logger_save_dir(["fit", "--trainer.logger=CSVLogger", "--trainer.logger.save_dir", "x"]) == [
        "fit", "--trainer.logger=CSVLogger", "--trainer.logger.save_dir", DEFAULT_ROOT_DIR,
        "--trainer.logger.save_dir", "x"]  # the later one is what jsonargparse keeps
    # WandbLogger-like loggers have a default save_dir; `false` is no class: both are left as they are.
    for argv in (["--trainer.logger", "MLFlowLogger"], ["--trainer.logger", "false"], ["--trainer.logger=true"]):
        assert with_logger_save_dir(argv) == argv


def test_a_missing_tensorboard_is_one_line_naming_the_extra(images: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Lightning's TensorBoardLogger takes tensorboard or tensorboardX; None in sys.modules makes an import fail.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger", "TensorBoardLogger"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("transfer-lit: error:")]
    assert "trainer.logger=lightning.pytorch.loggers.TensorBoardLogger" in line
    assert "pip install 'transfer-lit[tensorboard]'" in line
    assert not (tmp_path / "lightning_logs").exists()  # refused before anything was built


# ---------------------------------------------------------------------------------------------- learning rates


def test_metrics_csv_has_one_head_and_one_backbone_lr_column(images: Path, tmp_path: Path) -> None:
    """Epoch 0 trains the head only (the backbone's LR is 0 through its gates); epoch 1 thaws the output-side
    block, whose LR is ``lr x backbone_lr_mult``; the block thawed with it learns ``layer_decay`` times less."""
    recipe = tmp_path / "progressive.yaml"
    recipe.write_text("trainer:\n  max_epochs: 2\n  callbacks:\n    - class_path: transfer_lit.ProgressiveUnfreezing\n"
                      "      init_args: {schedule: {1: [features.12, classifier]}}\n"
                      "model: {mode: progressive, lr: 0.001, backbone_lr_mult: 0.1, layer_decay: 0.5}\n")
    cli = build_cli(["fit", "--config", str(DEBUG), "--config", str(recipe), "--data.root", str(images),
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "CSVLogger"])
    header, rows = lr_rows(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    assert {c for c in header if c.startswith("lr")} == {"lr-head", "lr-backbone"}
    assert [(row["epoch"], row["step"]) for row in rows] == [("", "0"), ("", "3")]  # each epoch's start: 3 batches
    assert [float(row["lr-head"]) for row in rows] == pytest.approx([1e-3, 1e-3])
    assert [float(row["lr-backbone"]) for row in rows] == pytest.approx([0.0, 1e-4])
    # The last row is what the optimizer's groups held (no scheduler: the same through the last epoch).
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    for column, group in (("lr-head", "head"), ("lr-backbone", "backbone.classifier")):
        effective = groups[group]["lr"] * groups[group]["gate"] * cli.model.lr_scale
        assert float(rows[-1][column]) == pytest.approx(effective)
    assert groups["backbone.features.12"]["lr"] == pytest.approx(0.5 * groups["backbone.classifier"]["lr"])


AppliedLRs = GateRecorder  # each group's (gate, lr) inside every optimizer.step


def test_step_logging_is_the_lr_each_step_applied_with_warmup_and_lr_scale(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TransferModule(TinyBackbone(), num_classes=3, mode="progressive", lr=0.05, backbone_lr_mult=0.1,
                           layer_decay=0.5)
    model.lr_scale = 0.5  # what LRFinder sets
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 3, (24,), generator=g)),
                      batch_size=8)
    applied, logger = AppliedLRs(), CSVLogger(tmp_path, name="run")
    unfreezing = ProgressiveUnfreezing(schedule={1: "block2", 2: "block1"}, warmup_steps=2)
    Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[unfreezing, LearningRates(logging_interval="step"), applied]).fit(model, data)
    _, rows = lr_rows(Path(logger.log_dir) / "metrics.csv")
    assert [int(row["step"]) for row in rows] == list(range(9))
    for row, step in zip(rows, applied.steps, strict=True):
        thawed = [step[f"backbone.{b}"][1] for b in ("stem", "block1", "block2") if step[f"backbone.{b}"][0] > 0]
        assert float(row["lr-head"]) == pytest.approx(step["head"][1])
        assert float(row["lr-backbone"]) == pytest.approx(thawed[-1] if thawed else 0.0)  # the output-side block
    # The numbers themselves: head 0.05 x 0.5; block2 0.005 x 0.5, warming up over 2 steps from epoch 1 on; block1
    # thawing in epoch 2 (its own warm-up, half the rate) does not change the column.
    assert [float(row["lr-head"]) for row in rows] == pytest.approx([0.025] * 9)
    assert [float(row["lr-backbone"]) for row in rows] == pytest.approx([0.0] * 3 + [0.00125] + [0.0025] * 5)


def test_learning_rates_refuses_an_unknown_interval() -> None:
    with pytest.raises(ValueError, match=r"logging_interval='batch'.*'epoch' and 'step'"):
        LearningRates(logging_interval="batch")  # type: ignore[arg-type]
