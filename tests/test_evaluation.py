"""Calibration (ECE, temperature scaling) and decision thresholds: the functions on known values, then a real fit
that fits them on validation, saves them in the checkpoint and uses them in ``test`` and ``predict``."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import CSVPredictionWriter, TransferModule
from transfer_lit.evaluation import (
    TopLabelECE,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    parse_threshold_rule,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- functions


def test_ece_of_known_bins() -> None:
    # two bins used: 0.95 confident and right half the time (gap 0.45), 0.65 confident and always right (gap 0.35)
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.35, 0.65]])
    target = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs, target, bins=10) == pytest.approx((0.45 * 2 + 0.35 * 2) / 4)
    metric = TopLabelECE(bins=10)
    metric.update(probs[:3], target[:3])
    metric.update(probs[3:], target[3:])
    assert float(metric.compute()) == pytest.approx(0.4)
    binary = torch.tensor([0.05, 0.05, 0.65, 0.65])  # P(class 1): the same predictions
    assert expected_calibration_error(binary, target, bins=10) == pytest.approx(0.4)


def test_fit_temperature_recovers_the_temperature_that_made_the_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=g) * 3
    target = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=g).squeeze(1)  # labels drawn at T = 2.5
    temperature = fit_temperature(logits, target, binary=False)
    assert temperature == pytest.approx(2.5, rel=0.08)
    before = expected_calibration_error(logits.softmax(-1), target)
    after = expected_calibration_error((logits / temperature).softmax(-1), target)
    assert after < 0.5 * before
    z = torch.randn(4000, generator=g) * 4
    y = torch.bernoulli((z / 0.5).sigmoid(), generator=g)  # under-confident logits: T = 0.5
    assert fit_temperature(z, y, binary=True) == pytest.approx(0.5, rel=0.1)


def test_thresholds_for_f1_recall_and_precision() -> None:
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    target = torch.tensor([1, 1, 0, 1, 1, 0, 0, 0])
    # predicting the top 5 positive: tp 4, fp 1 -> F1 8/9 (the best); cut halfway between 0.4 and 0.3
    assert choose_threshold(probs, target, "max_f1", 0) == pytest.approx(0.35)
    assert choose_threshold(probs, target, "recall", 0.5) == pytest.approx(0.75)  # top 2: recall 0.5
    assert choose_threshold(probs, target, "precision", 0.8) == pytest.approx(0.35)  # top 5: 4/5, the most recall
    assert choose_threshold(probs, target, "precision", 1.0) == pytest.approx(0.75)
    predicted = probs >= choose_threshold(probs, target, "max_f1", 0)
    assert int((predicted & (target == 1)).sum()) == 4 and int(predicted.sum()) == 5


@pytest.mark.parametrize("rule", [1.5, 0, "f1", "recall>=2", "recall>=x", True])
def test_a_bad_threshold_rule_names_the_key_and_what_is_valid(rule: Any) -> None:
    with pytest.raises(ValueError, match=r"model.threshold must be a probability in \(0, 1\) or one of \['max_f1'"):
        parse_threshold_rule(rule)


def test_a_threshold_rule_needs_a_binary_task() -> None:
    with pytest.raises(ValueError, match=r"model.threshold='max_f1' is for task 'binary'"):
        TransferModule(TinyBackbone(), num_classes=3, threshold="max_f1")


# ---------------------------------------------------------------------------------------------- in a run


def binary_loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) + 0.3 * torch.randn(n, generator=g) > 0.3).long()  # imbalanced: about 1 in 4 positive
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_temperature_and_threshold_are_fitted_on_validation_saved_and_used_by_test_and_predict(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TransferModule(TinyBackbone(), num_classes=2, task="binary", lr=0.05, calibration="temperature",
                           threshold="max_f1")
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[saver], num_sanity_val_steps=0)
    trainer.fit(model, binary_loader(96, 0), binary_loader(64, 1))
    temperature, threshold = model.decision.temperature, model.decision.threshold
    assert temperature != 1.0 and threshold != 0.5
    assert float(trainer.callback_metrics["val_temperature"]) == pytest.approx(temperature)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["transfer_lit"]["decision"]
    assert saved == {"temperature": temperature, "threshold": threshold}

    # test: the confusion matrix and binary metrics use the fitted threshold on the calibrated probabilities
    trainer.test(model, binary_loader(64, 2), verbose=False)
    x, y = binary_loader(64, 2).dataset.tensors
    model.eval()
    with torch.no_grad():
        p1 = (model(x).squeeze(-1) / temperature).sigmoid()
    predicted = (p1 >= threshold).long()
    assert float(trainer.callback_metrics["test_acc"]) == pytest.approx(float((predicted == y).float().mean()))
    assert f"{int(((predicted == 1) & (y == 1)).sum()):>6}" in model.last_test_report.splitlines()[-1]

    # predict after reloading the checkpoint: the same threshold decides the class
    fresh = TransferModule(TinyBackbone(), num_classes=2, task="binary", calibration="temperature",
                           threshold="max_f1")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.on_load_checkpoint(checkpoint)
    assert (fresh.decision.temperature, fresh.decision.threshold) == (temperature, threshold)
    out = tmp_path / "predictions.csv"
    paths = DataLoader([(x[i], f"img{i}.png") for i in range(len(x))], batch_size=16)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
            callbacks=[CSVPredictionWriter(str(out))]).predict(fresh, paths, return_predictions=False)
    rows = list(csv.DictReader(out.open()))
    assert [int(r["prediction"]) for r in rows] == predicted.tolist()
    assert [float(r["p_1"]) for r in rows] == pytest.approx(p1.tolist(), abs=1e-5)


# ---------------------------------------------------------------------------------------------- the report


def test_fit_and_test_write_the_report_next_to_the_checkpoint_with_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import CSVLogger
    from PIL import Image

    torch.manual_seed(0)
    model = TransferModule(TinyBackbone(), num_classes=2, task="binary", lr=0.05, class_names=["cat", "dog"],
                           calibration="temperature")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=CSVLogger(tmp_path, name="logs"),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[saver], num_sanity_val_steps=0)
    trainer.fit(model, binary_loader(96, 0), binary_loader(64, 1))
    trainer.test(model, binary_loader(64, 2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    folder = tmp_path / "ckpt"
    for stage in ("val", "test"):
        rows = list(csv.reader((folder / f"{stage}_confusion.csv").open()))
        assert rows[0] == ["true \\ predicted", "cat", "dog"] and sum(int(v) for r in rows[1:] for v in r[1:]) == 64
        per_class = list(csv.DictReader((folder / f"{stage}_per_class.csv").open()))
        assert [r["class"] for r in per_class] == ["cat", "dog", "macro avg"]
        report = (folder / f"{stage}_report.md").read_text()
        assert "| class | precision | recall | f1 | support |" in report and "temperature" in report
        for plot in ("confusion", "roc", "pr", "reliability"):
            with Image.open(folder / f"{stage}_{plot}.png") as image:
                assert image.size[0] > 300 and image.size[1] > 300
                colours = image.convert("L").getextrema()
                assert colours[0] < 100 < colours[1]  # ink on the page: axes, labels, curves
    test_cm = [[int(v) for v in r[1:]] for r in list(csv.reader((folder / "test_confusion.csv").open()))[1:]]
    assert test_cm == torch.tensor(test_cm).tolist() and sum(map(sum, test_cm)) == 64
    assert (folder / "learning_curves.png").is_file()


def test_without_matplotlib_the_tables_are_written_and_one_line_says_how_to_get_plots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from transfer_lit.evaluation.report import Predictions, write_report

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    predictions = Predictions.from_probabilities(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
                                                 torch.tensor([0, 1, 1]), ["a", "b"])
    files, hint = write_report(predictions, tmp_path, "test")
    assert sorted(f.name for f in files) == ["test_confusion.csv", "test_per_class.csv", "test_report.md"]
    assert hint == "pip install 'transfer-lit[plots]' (matplotlib) to get the PNG plots as well"
    assert not list(tmp_path.glob("*.png"))


def test_writing_plots_leaves_the_users_matplotlib_backend_alone(tmp_path: Path) -> None:
    # A notebook's inline backend (or any other) must survive a report: no matplotlib.use("Agg").
    pytest.importorskip("matplotlib")
    code = (
        "import sys, matplotlib; matplotlib.use('svg')\n"
        "from transfer_lit.evaluation.plots import subplots\n"
        "fig, ax = subplots(figsize=(2, 2)); ax.plot([0, 1]); fig.savefig(sys.argv[1])\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "plot.png")], check=True)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_validation_and_test_split_of_one_image_gets_its_report(tmp_path: Path) -> None:
    # torchmetrics squeezes a one-element epoch result to a scalar: one binary image's logit and target.
    torch.manual_seed(0)
    model = TransferModule(TinyBackbone(), num_classes=2, task="binary", class_names=["cat", "dog"],
                           calibration="temperature", threshold="max_f1")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[saver], num_sanity_val_steps=0)
    trainer.fit(model, binary_loader(16, 0), binary_loader(1, 1))
    trainer.test(model, binary_loader(1, 2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    rows = list(csv.reader((tmp_path / "ckpt" / "test_confusion.csv").open()))
    assert sum(int(v) for r in rows[1:] for v in r[1:]) == 1
