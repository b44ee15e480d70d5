"""PNG plots of an evaluation (matplotlib, the ``[plots]`` extra; imported only when it is installed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure  # not pyplot: files only, and a notebook's own backend (inline plots) untouched

from transfer_lit.evaluation.calibration import reliability_bins
from transfer_lit.evaluation.report import Predictions, curve


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def subplots(*grid: int, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """``plt.subplots`` without pyplot: a figure of its own and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def confusion_png(predictions: Predictions, path: Path) -> Path:
    """The confusion matrix with the class names on both axes and the count in each cell."""
    confusion, names = predictions.confusion(), predictions.class_names
    size = 2.5 + 0.45 * len(names)
    fig, ax = subplots(figsize=(size + 1, size))
    image = ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    peak = int(confusion.max()) or 1
    for (i, j), value in zip(torch.cartesian_prod(torch.arange(len(names)), torch.arange(len(names))).tolist(),
                             confusion.flatten().tolist(), strict=True):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    ax.set_title("confusion matrix")
    return _save(fig, path)


def roc_label(name: str, fpr: torch.Tensor, tpr: torch.Tensor, positive: torch.Tensor) -> str:
    """``"cat (AUC 0.912)"``; without a positive (or a negative) sample the curve is flat, its area 0 meaningless:
    ``"cat (AUC n/a: no cat samples)"``."""
    if 0 < int(positive.sum()) < len(positive):
        return f"{name} (AUC {float(torch.trapezoid(tpr, fpr)):.3f})"
    return f"{name} (AUC n/a: {'only' if positive.any() else 'no'} {name} samples)"


def curves_png(predictions: Predictions, roc_path: Path, pr_path: Path) -> list[Path]:
    """ROC and precision-recall curves: class 1 for binary tasks, one per class (one-vs-rest) for multiclass."""
    classes = [1] if len(predictions.class_names) == 2 else list(range(len(predictions.class_names)))
    roc, roc_ax = subplots(figsize=(5.5, 5))
    pr, pr_ax = subplots(figsize=(5.5, 5))
    for c in classes:
        positive = predictions.target == c
        fpr, tpr, precision = curve(predictions.probs[:, c], positive)
        name = predictions.class_names[c]
        roc_ax.plot(fpr.numpy(), tpr.numpy(), label=roc_label(name, fpr, tpr, positive))
        pr_ax.plot(tpr.numpy(), precision.numpy(), label=f"{name} (base {float(positive.double().mean()):.2f})")
    roc_ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    for ax, title, x, y in ((roc_ax, "ROC", "false positive rate", "true positive rate"),
                            (pr_ax, "precision-recall", "recall", "precision")):
        ax.set(title=title, xlabel=x, ylabel=y, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
    return [_save(roc, roc_path), _save(pr, pr_path)]


def reliability_png(predictions: Predictions, path: Path, bins: int = 15) -> Path:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with the sample counts."""
    confidence, accuracy, count = reliability_bins(predictions.probs, predictions.target, bins)
    used = count > 0
    edges = torch.linspace(0, 1, bins + 1)
    centres = ((edges[:-1] + edges[1:]) / 2)[used]
    fig, ax = subplots(figsize=(5.5, 5))
    ax.bar(centres.numpy(), accuracy[used].numpy(), width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(confidence[used].numpy(), accuracy[used].numpy(), "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    for x, n in zip(centres.tolist(), count[used].tolist(), strict=True):
        ax.text(x, 0.02, str(int(n)), ha="center", fontsize=7)
    ax.set(title="reliability diagram", xlabel="confidence (top label)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def learning_curves_png(metrics_csv: Path, path: Path) -> Path | None:
    """Losses and validation accuracy / F1 per epoch from a CSVLogger's ``metrics.csv`` (None if it has none)."""
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        epoch = row.get("epoch")
        for key in ("train_loss_epoch", "val_loss", "train_acc", "val_acc", "val_f1"):
            if row.get(key) not in (None, "") and epoch not in (None, ""):
                series.setdefault(key, {})[int(float(epoch))] = float(row[key])
    if not series:
        return None
    fig, (loss_ax, score_ax) = subplots(1, 2, figsize=(10, 4))
    for key, points in series.items():
        ax = loss_ax if "loss" in key else score_ax
        ax.plot(list(points), list(points.values()), marker="o", label=key)
    loss_ax.set(title="loss", xlabel="epoch")
    score_ax.set(title="accuracy / F1", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, score_ax):
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(predictions: Predictions, folder: Path, stage: str, metrics_csv: Path | None = None) -> list[Path]:
    """Every plot of ``stage`` into ``folder``; the learning curves too when ``metrics_csv`` exists."""
    files = [confusion_png(predictions, folder / f"{stage}_confusion.png"),
             *curves_png(predictions, folder / f"{stage}_roc.png", folder / f"{stage}_pr.png"),
             reliability_png(predictions, folder / f"{stage}_reliability.png")]
    if metrics_csv is not None and metrics_csv.is_file():
        learning = learning_curves_png(metrics_csv, folder / "learning_curves.png")
        files += [learning] if learning else []
    return files
