"""Classification metrics per stage, and the per-class report printed after ``test``.

Training metrics are updated every step, so their update must not read device values on the host (on CUDA
each read stalls the step until the GPU catches up): no argument validation, no AUROC (it keeps every
prediction of the epoch on the device), and multiclass rates from :class:`MulticlassRates`.
"""

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


class MulticlassRates(Metric):
    """Accuracy and macro precision / recall / F1 of a multiclass problem, from one confusion matrix.

    The values of torchmetrics' ``Accuracy`` (micro) and macro ``Precision`` / ``Recall`` / ``F1Score`` (classes
    with no sample and no prediction left out of the average), but the update never synchronises with the
    device: torchmetrics' multiclass update counts with ``torch.bincount``, which on CUDA reads the range of
    its input on the host every step. ``compute`` returns ``{"acc", "precision", "recall", "f1"}``.

    Args:
        num_classes: number of classes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confusion: torch.Tensor

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("confusion", torch.zeros(num_classes * num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Count ``(true, predicted)`` pairs; ``probs`` is ``(batch, num_classes)`` (any score, argmax is taken)."""
        index = target.long().flatten() * self.num_classes + probs.argmax(-1).flatten()
        self.confusion.index_put_((index,), torch.ones_like(index), accumulate=True)

    def compute(self) -> dict[str, torch.Tensor]:
        confusion = self.confusion.view(self.num_classes, self.num_classes).double()
        precision, recall, f1 = class_rates(confusion)
        present = ((confusion.sum(0) + confusion.sum(1)) > 0).double()  # some sample or some prediction

        def macro(score: torch.Tensor) -> torch.Tensor:
            return ((score * present).sum() / present.sum().clamp(min=1)).float()

        accuracy = _ratio(confusion.diag().sum(), confusion.sum()).float()
        return {"acc": accuracy, "precision": macro(precision), "recall": macro(recall), "f1": macro(f1)}


def build_train_metrics(task: Task, num_classes: int) -> MetricCollection:
    """``train_acc`` / ``train_precision`` / ``train_recall`` / ``train_f1``, updated without a device sync.

    Args:
        task: ``multiclass``, ``binary`` or ``multilabel``.
        num_classes: classes (multiclass, binary: 2) or labels (multilabel).
    """
    if task == "multiclass":
        return MetricCollection({"rates": MulticlassRates(num_classes)}, prefix="train_")
    kw: dict[str, Any] = {"task": "binary"} if task == "binary" else {
        "task": "multilabel", "num_labels": num_classes, "average": "macro"}
    kw["validate_args"] = False  # the checks read values on the host
    metrics = {"acc": Accuracy(**kw), "precision": Precision(**kw), "recall": Recall(**kw), "f1": F1Score(**kw)}
    return MetricCollection(metrics, prefix="train_")  # type: ignore[arg-type]


def build_confusion_matrix(task: Task, num_classes: int) -> Metric:
    """Confusion matrix for the test report (multiclass and binary; multilabel gets one per label)."""
    if task == "multilabel":
        return ConfusionMatrix(task="multilabel", num_labels=num_classes)
    return ConfusionMatrix(task="multiclass", num_classes=num_classes if task == "multiclass" else 2)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a))


def class_rates(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class precision, recall and F1 of ``(C, C)`` counts (rows true class), 0 where undefined."""
    confusion = confusion.to(torch.float64)
    tp, predicted, support = confusion.diag(), confusion.sum(0), confusion.sum(1)
    return _ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, predicted + support)


def format_report(confusion: torch.Tensor, class_names: list[str]) -> str:
    """Per-class precision / recall / F1 / support table, then the confusion matrix (rows = true class).

    Args:
        confusion: ``(C, C)`` counts, rows true class, columns predicted class.
        class_names: one name per row.
    """
    confusion = confusion.to(torch.float64)
    support = confusion.sum(1)
    precision, recall, f1 = class_rates(confusion)
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
