"""Classification metrics per stage, and the per-class report printed after ``test``.

Training metrics are updated every step, so their update must not read device values on the host (on CUDA
each read stalls the step until the GPU catches up): no argument validation, no AUROC (it keeps every
prediction of the epoch on the device), and multiclass rates from :class:`MulticlassRates`.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Accuracy, ConfusionMatrix, F1Score, Metric, MetricCollection, Precision, Recall
from torchmetrics.functional import auroc
from torchmetrics.utilities import dim_zero_cat

from transfer_lit.evaluation.calibration import TopLabelECE
from transfer_lit.evaluation.decision import PredictionStore

Task = Literal["multiclass", "binary", "multilabel"]


def check_task(task: Task, num_classes: int, class_names: list[str] | None, class_weights: list[float] | None,
               label_smoothing: float) -> None:
    """Raise ``ValueError`` naming the ``model.*`` key when the task's arguments do not fit together."""
    if task not in get_args(Task):
        raise ValueError(f"model.task must be one of {list(get_args(Task))}, got {task!r}")
    if task == "binary" and num_classes != 2:
        raise ValueError(f"model.num_classes must be 2 for task 'binary', got {num_classes}")
    if num_classes < 2 and task == "multiclass":
        raise ValueError(f"model.num_classes must be >= 2 for task 'multiclass', got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"model.class_names has {len(class_names)} names but model.num_classes={num_classes}")
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"model.class_weights has {len(class_weights)} values, expected num_classes={num_classes}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")


class SplitAUROC(Metric):
    """torchmetrics' AUROC of the epoch's predictions (macro for multiclass and multilabel), or NaN where it is
    undefined: a class with no sample in the split (a label with no positive or no negative sample). torchmetrics
    counts 0 for such a class (a one-class binary split: 0.0, which reads as the worst possible model); here one
    warning per split and set of classes names them. The other metrics do not change.

    Args:
        task: ``multiclass``, ``binary`` or ``multilabel``.
        num_classes: classes (multiclass, binary: 2) or labels (multilabel).
        split: the split's name in the warning (``val``, ``test``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    preds: list[torch.Tensor]
    target: list[torch.Tensor]

    def __init__(self, task: Task, num_classes: int, split: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task, self.num_classes, self.split = task, num_classes, split
        self.class_names = [str(i) for i in range(num_classes)]  # set by StageMetrics.epoch_values
        self._warned: set[tuple[str, ...]] = set()
        self.add_state("preds", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds)
        self.target.append(target)

    def undefined(self, target: torch.Tensor) -> list[str]:
        """The classes (labels) of ``target`` whose one-vs-rest AUROC is undefined."""
        if self.task == "multilabel":
            positives = target.sum(0)
            missing = (positives == 0) | (positives == len(target))
        else:
            missing = torch.bincount(target.flatten().long(), minlength=self.num_classes) == 0
        return [self.class_names[i] for i in missing.nonzero().flatten().tolist()]

    def compute(self) -> torch.Tensor:
        if isinstance(self.preds, list) and not self.preds:
            return torch.tensor(float("nan"))
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        undefined = self.undefined(target)
        if not undefined:
            return torch.as_tensor(auroc(preds, target, **_task_arguments(self.task, self.num_classes)))
        if tuple(undefined) not in self._warned:
            self._warned.add(tuple(undefined))
            what = "label(s) with no positive or no negative sample" if self.task == "multilabel" else \
                "no sample of class(es)"
            rank_zero_warn(f"transfer_lit metrics: {self.split}_auroc is NaN (undefined, not 0): the {self.split} "
                           f"split has {what} {undefined} among the {len(target)} samples evaluated")
        return torch.tensor(float("nan"), device=preds.device)


def _task_arguments(task: Task, num_classes: int) -> dict[str, Any]:
    if task == "multiclass":
        return {"task": "multiclass", "num_classes": num_classes, "average": "macro"}
    if task == "binary":
        return {"task": "binary"}
    return {"task": "multilabel", "num_labels": num_classes, "average": "macro"}


def build_metrics(task: Task, num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro precision / recall / F1, AUROC (:class:`SplitAUROC`) and (not multilabel) the top-label ECE,
    named ``{prefix}_acc`` etc.

    Args:
        task: ``multiclass`` (one label per sample), ``binary`` or ``multilabel``.
        num_classes: classes (multiclass, binary: 2) or labels (multilabel).
        prefix: stage name, ``train`` / ``val`` / ``test``.
    """
    kw = _task_arguments(task, num_classes)
    metrics: dict[str, Metric | MetricCollection] = {
        "acc": Accuracy(**{**kw, "average": "micro"} if task == "multiclass" else kw),
        "precision": Precision(**kw),
        "recall": Recall(**kw),
        "f1": F1Score(**kw),
        "auroc": SplitAUROC(task, num_classes, prefix),
    }
    if task != "multilabel":
        metrics["ece"] = TopLabelECE()
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


class StageMetrics(nn.Module):
    """Every stage's metrics for one task: sync-free training rates, validation and test collections (with
    AUROC) and the test confusion matrix behind the per-class report.

    Args:
        task: ``multiclass``, ``binary`` or ``multilabel``.
        num_classes: classes (multiclass, binary: 2) or labels (multilabel).
    """

    def __init__(self, task: Task, num_classes: int) -> None:
        super().__init__()
        self.task = task
        self.train_metrics = build_train_metrics(task, num_classes)
        self.val_metrics = build_metrics(task, num_classes, "val")
        self.test_metrics = build_metrics(task, num_classes, "test")
        self.test_confusion = build_confusion_matrix(task, num_classes)
        self.val_store, self.test_store = PredictionStore(), PredictionStore()  # logits, for fits and curves
        self.threshold = 0.5

    def update(self, stage: str, probs: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Add one batch's probabilities and targets to ``stage``'s metrics (and its ``logits`` to the validation or
        test store)."""
        getattr(self, f"{stage}_metrics").update(probs, target)
        if logits is not None and stage in ("val", "test"):
            getattr(self, f"{stage}_store").update(logits, target)
        if stage == "test":
            self.test_confusion.update(probs if self.task != "binary" else (probs >= self.threshold).long(), target)

    def set_threshold(self, threshold: float) -> None:
        """Binary tasks: the decision threshold of the test metrics and confusion matrix (probability of class 1)."""
        self.threshold = threshold
        for metric in self.test_metrics.values():
            if hasattr(metric, "threshold"):
                metric.threshold = threshold

    def epoch_values(self, stage: str, class_names: list[str] | None = None) -> Any:
        """What to log at the end of ``stage``'s epoch: the collection itself (Lightning computes, syncs and resets
        it; ``class_names`` name the classes in its warnings), except for training, whose rates are computed here
        and reset (they compute four values at once)."""
        if stage != "train":
            collection = getattr(self, f"{stage}_metrics")
            if class_names:
                collection[f"{stage}_auroc"].class_names = list(class_names)
            return collection
        values = self.train_metrics.compute()
        self.train_metrics.reset()
        return values

    def test_report(self, class_names: list[str]) -> str:
        """The per-class table and confusion matrix of the test epoch (empty for multilabel); resets the matrix."""
        if self.task == "multilabel":
            return ""
        names = class_names if self.task == "multiclass" else class_names[:2]
        report = format_report(self.test_confusion.compute().cpu(), names)
        self.test_confusion.reset()
        return report
