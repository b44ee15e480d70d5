"""Metrics per stage and the per-class test report."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone, make_image_folder
from lightning.pytorch import Trainer

from transfer_lit import ImageDataModule, TransferModule
from transfer_lit.metrics import build_confusion_matrix, build_metrics, format_report

# rows: true class, columns: predicted class
CONFUSION = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])


def _row(report: str, name: str) -> list[str]:
    return next(line.split() for line in report.splitlines() if line.startswith(name))


def test_format_report_exact_per_class_numbers() -> None:
    report = format_report(CONFUSION, ["ants", "bees", "wasps"])
    # precision = tp / column sum, recall = tp / row sum, f1 = harmonic mean
    assert _row(report, "ants") == ["ants", "0.7143", "0.8333", "0.7692", "6"]
    assert _row(report, "bees") == ["bees", "0.7500", "0.5000", "0.6000", "6"]
    assert _row(report, "wasps") == ["wasps", "0.8000", "1.0000", "0.8889", "4"]
    assert _row(report, "macro avg") == ["macro", "avg", "0.7548", "0.7778", "0.7527", "16"]
    lines = report.splitlines()
    start = lines.index("confusion matrix (rows: true, columns: predicted)")
    assert lines[start + 1].split() == ["0", "1", "2"]
    assert [line.split() for line in lines[start + 2:]] == [["ants", "5", "1", "0"], ["bees", "2", "3", "1"],
                                                             ["wasps", "0", "0", "4"]]


def test_format_report_class_never_predicted_or_absent_is_zero_not_nan() -> None:
    report = format_report(torch.tensor([[3, 0], [2, 0]]), ["a", "b"])
    assert _row(report, "b") == ["b", "0.0000", "0.0000", "0.0000", "2"]
    report = format_report(torch.tensor([[3, 0], [0, 0]]), ["a", "b"])
    assert _row(report, "b") == ["b", "0.0000", "0.0000", "0.0000", "0"]
    assert "nan" not in report.lower()


@pytest.mark.parametrize(("task", "num_classes"), [("multiclass", 3), ("binary", 2), ("multilabel", 4)])
def test_build_metrics_names(task: str, num_classes: int) -> None:
    metrics = build_metrics(task, num_classes, "val")  # type: ignore[arg-type]
    ece = [] if task == "multilabel" else ["val_ece"]  # the top-label ECE has no multilabel meaning
    assert sorted(metrics.keys()) == sorted(["val_acc", "val_auroc", "val_f1", "val_precision", "val_recall", *ece])


def test_multiclass_metric_values() -> None:
    metrics = build_metrics("multiclass", 3, "test")
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    target = torch.tensor([0, 1, 1, 2])  # third sample wrong: predicted 0, true 1
    values = metrics(probs, target)
    assert values["test_acc"] == pytest.approx(0.75)  # micro: 3 of 4
    # per class precision 1/2, 1, 1; recall 1, 1/2, 1
    assert values["test_precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert values["test_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert values["test_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_binary_confusion_matrix_counts_thresholded_probabilities() -> None:
    confusion = build_confusion_matrix("binary", 2)
    probs = torch.tensor([0.9, 0.2, 0.7, 0.4])
    confusion.update((probs > 0.5).long(), torch.tensor([1, 0, 0, 1]))
    assert confusion.compute().tolist() == [[1, 1], [1, 1]]


def test_trainer_test_prints_report_with_every_class(image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ImageDataModule(root=str(image_folder), batch_size=8, num_workers=0)
    torch.manual_seed(0)
    model = TransferModule(TinyBackbone(), num_classes=data.num_classes, class_names=data.class_names)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.test(model, datamodule=data)
    out = capsys.readouterr().out
    assert model.last_test_report and model.last_test_report in out
    for name in ("blue", "green", "red"):
        assert int(_row(model.last_test_report, name)[-1]) == 6  # support: 6 test images per class
    assert _row(model.last_test_report, "macro avg")[-1] == "18"
    lines = model.last_test_report.splitlines()
    start = lines.index("confusion matrix (rows: true, columns: predicted)")
    matrix = torch.tensor([[int(v) for v in line.split()[1:]] for line in lines[start + 2:]])
    assert matrix.shape == (3, 3) and matrix.sum(1).tolist() == [6, 6, 6]
    metrics = trainer.callback_metrics
    for key in ("test_loss", "test_acc", "test_precision", "test_recall", "test_f1", "test_auroc"):
        assert key in metrics, sorted(metrics)
    assert metrics["test_acc"].item() == pytest.approx(matrix.diag().sum().item() / 18)


# ----------------------------------------------------------------- AUROC of a split that lacks a class

AUROC_CASES = {  # classes, torchmetrics' arguments, scores, a target with every class, one lacking a class
    "multiclass": (3, {"num_classes": 3}, torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4],
                                                        [0.5, 0.4, 0.1]]),
                   torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 0, 1])),
    "binary": (2, {}, torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([1, 0, 0, 1]), torch.tensor([0, 0, 0, 0])),
    "multilabel": (2, {"num_labels": 2}, torch.tensor([[0.9, 0.2], [0.3, 0.6], [0.6, 0.1], [0.2, 0.7]]),
                   torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]), torch.tensor([[1, 1], [0, 1], [1, 1], [0, 1]])),
}


@pytest.mark.parametrize("task", list(AUROC_CASES))
def test_auroc_is_torchmetrics_with_every_class_and_nan_with_one_warning_without_one(task: str) -> None:
    """torchmetrics counts 0 for a class without samples: a one-class binary split logged val_auroc 0.0."""
    from torchmetrics import AUROC

    num_classes, kw, scores, every, lacking = AUROC_CASES[task]
    metrics = build_metrics(task, num_classes, "val")  # type: ignore[arg-type]
    metrics.update(scores[:2], every[:2])
    metrics.update(scores[2:], every[2:])
    reference = AUROC(task=task, **kw)(scores, every)  # type: ignore[arg-type]
    assert float(metrics.compute()["val_auroc"]) == pytest.approx(float(reference))
    metrics.reset()
    auroc = metrics["val_auroc"]
    auroc.class_names = ["ant", "bee", "wasp"][:num_classes]
    absent = {"multiclass": "['wasp']", "binary": "['bee']", "multilabel": "['bee']"}[task]
    with pytest.warns(UserWarning, match=rf"val_auroc is NaN \(undefined, not 0\): the val split has .*"
                                         rf"{re.escape(absent)} among the 4 samples evaluated") as warned:
        metrics.update(scores, lacking)
        values = metrics.compute()
    assert torch.isnan(values["val_auroc"]) and not torch.isnan(values["val_acc"])
    assert len([w for w in warned if "val_auroc" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per split and set of classes
        auroc.reset()
        auroc.update(scores, lacking)
        assert torch.isnan(auroc.compute())


def test_a_validation_split_without_a_class_logs_nan_auroc_and_checkpoints_on_val_acc(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from transfer_lit.callbacks.epoch_summary import validation_summary
    from transfer_lit.evaluation.plots import roc_label

    root = make_image_folder(tmp_path / "images", {"train": 4, "val": 2}, size=16)
    shutil.rmtree(root / "val" / "green")
    data = ImageDataModule(root=str(root), batch_size=4, num_workers=0)
    model = TransferModule(TinyBackbone(), num_classes=3, class_names=data.class_names)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", filename="best-{val_acc:.4f}")
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[best])
    with pytest.warns(UserWarning, match=r"the val split has no sample of class\(es\) \['green'\] among the 4"):
        trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isnan(metrics["val_auroc"]) and 0 <= float(metrics["val_acc"]) <= 1
    assert best.best_model_path.endswith(f"best-val_acc={float(metrics['val_acc']):.4f}.ckpt")
    assert "val_auroc=n/a" in validation_summary(trainer)
    report = (tmp_path / "ckpt" / "val_report.md").read_text()  # written in full, nothing raised
    assert "| green | 0.0000 | 0.0000 | 0.0000 | 0 |" in report
    positive = torch.zeros(4, dtype=torch.bool)
    assert roc_label("green", torch.zeros(5), torch.zeros(5), positive) == "green (AUC n/a: no green samples)"
    assert roc_label("red", torch.zeros(5), torch.zeros(5), ~positive) == "red (AUC n/a: only red samples)"
