"""Metrics per stage and the per-class test report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone
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
