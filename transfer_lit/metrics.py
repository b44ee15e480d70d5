"""Classification metrics per stage, and the per-class report printed after ``test``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torchmetrics import AUROC, Accuracy, ConfusionMatrix, F1Score, Metric, MetricCollection, Precision, Recall

Task = Literal["multiclass", "binary", "multilabel"]


def build_metrics(task: Task, num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro precision / recall / F1 and AUROC, named ``{prefix}_acc`` etc.

    Args:
        task: ``multiclass`` (one label per sample), ``binary`` or ``multilabel``.
        num_classes: classes (multiclass, binary: 2) or labels (multilabel).
        prefix: stage name, ``train`` / ``val`` / ``test``.
    """
    if task == "multiclass":
        kw: dict[str, Any] = {"task": "multiclass", "num_classes": num_classes, "average": "macro"}
    elif task == "binary":
        kw = {"task": "binary"}
    else:
        kw = {"task": "multilabel", "num_labels": num_classes, "average": "macro"}
    metrics: dict[str, Metric | MetricCollection] = {
        "acc": Accuracy(**{**kw, "average": "micro"} if task == "multiclass" else kw),
        "precision": Precision(**kw),
        "recall": Recall(**kw),
        "f1": F1Score(**kw),
        "auroc": AUROC(**kw),
    }
    return MetricCollection(metrics, prefix=f"{prefix}_")


def build_confusion_matrix(task: Task, num_classes: int) -> Metric:
    """Confusion matrix for the test report (multiclass and binary; multilabel gets one per label)."""
    if task == "multilabel":
        return ConfusionMatrix(task="multilabel", num_labels=num_classes)
    return ConfusionMatrix(task="multiclass", num_classes=num_classes if task == "multiclass" else 2)


def format_report(confusion: torch.Tensor, class_names: list[str]) -> str:
    """Per-class precision / recall / F1 / support table, then the confusion matrix (rows = true class).

    Args:
        confusion: ``(C, C)`` counts, rows true class, columns predicted class.
        class_names: one name per row.
    """
    confusion = confusion.to(torch.float64)
    tp = confusion.diag()
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0 * tp)
    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}} {precision[i]:9.4f} {recall[i]:9.4f} {f1[i]:9.4f} {int(support[i]):9d}")
    lines.append(f"{'macro avg':<{width}} {precision.mean():9.4f} {recall.mean():9.4f} {f1.mean():9.4f} "
                 f"{int(support.sum()):9d}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    cell = max(6, len(str(int(confusion.max().item()))) + 1)
    lines.append(" " * width + "".join(f"{i:>{cell}}" for i in range(len(class_names))))
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{cell}}" for v in confusion[i].tolist()))
    return "\n".join(lines)
