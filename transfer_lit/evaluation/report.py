"""The evaluation report written next to the checkpoint: per-class table and confusion matrix (CSV + Markdown),
and with matplotlib (``pip install 'transfer-lit[plots]'``) PNG plots of the confusion matrix, ROC and
precision-recall curves (one per class for multiclass), the reliability diagram and the learning curves."""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from transfer_lit.evaluation.calibration import expected_calibration_error, per_class
from transfer_lit.evaluation.thresholds import ranked_counts
from transfer_lit.metrics import class_rates

PLOTS_HINT = "pip install 'transfer-lit[plots]' (matplotlib) to get the PNG plots as well"


@dataclass
class Predictions:
    """One split's predictions: ``probs`` ``(N, C)`` (binary: ``[P(0), P(1)]``), the predicted and true classes."""

    probs: torch.Tensor
    predicted: torch.Tensor
    target: torch.Tensor
    class_names: list[str]

    @classmethod
    def from_probabilities(cls, probs: torch.Tensor, target: torch.Tensor, class_names: list[str],
                           threshold: float = 0.5) -> Predictions:
        """Binary ``probs`` of shape ``(N,)`` are decided at ``threshold``; multiclass by the largest probability."""
        probs, target = probs.detach().double().cpu(), target.detach().cpu().long()
        predicted = (probs >= threshold).long() if probs.ndim == 1 else probs.argmax(1)
        probs = per_class(probs)
        return cls(probs, predicted, target, list(class_names)[: probs.shape[1]])

    def confusion(self) -> torch.Tensor:
        """``(C, C)`` counts, rows the true class."""
        c = self.probs.shape[1]
        return torch.bincount(self.target * c + self.predicted, minlength=c * c).view(c, c)


def curve(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-vs-rest ROC and PR points of ``scores`` for the boolean ``positive``: (fpr, tpr, precision); recall = tpr.
    Points are cut between distinct scores, from the highest."""
    _, tp, k, distinct = ranked_counts(scores, positive)
    tp, fp = tp[distinct], (k - tp)[distinct]
    positives = float(positive.sum())
    tpr, fpr = tp / max(1.0, positives), fp / max(1.0, len(positive) - positives)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fpr]), torch.cat([zero, tpr]), torch.cat([torch.ones(1, dtype=torch.float64),
                                                                       tp / (tp + fp)])


def write_tables(predictions: Predictions, folder: Path, stage: str, summary: dict[str, float]) -> list[Path]:
    """``{stage}_per_class.csv``, ``{stage}_confusion.csv`` and ``{stage}_report.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    names, confusion = predictions.class_names, predictions.confusion()
    precision, recall, f1 = class_rates(confusion)
    support = confusion.sum(1)
    per_class, matrix, markdown = (folder / f"{stage}_{n}" for n in ("per_class.csv", "confusion.csv", "report.md"))
    with per_class.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(names):
            writer.writerow([name, f"{precision[i]:.4f}", f"{recall[i]:.4f}", f"{f1[i]:.4f}", int(support[i])])
        writer.writerow(["macro avg", f"{precision.mean():.4f}", f"{recall.mean():.4f}", f"{f1.mean():.4f}",
                         int(support.sum())])
    with matrix.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        for i, name in enumerate(names):
            writer.writerow([name, *confusion[i].tolist()])
    decided = ("Decided with the checkpoint's temperature and threshold (`model.calibration`, `model.threshold`); "
               "the logged `val_*` metrics are the raw model's." if "temperature" in summary else "")
    lines = [f"# {stage} report", "", ", ".join(f"{k} {v:.4g}" for k, v in summary.items()), "", decided,
             "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {precision[i]:.4f} | {recall[i]:.4f} | {f1[i]:.4f} | {int(support[i])} |"
              for i, n in enumerate(names)]
    lines += [f"| macro avg | {precision.mean():.4f} | {recall.mean():.4f} | {f1.mean():.4f} | {int(support.sum())} |",
              "", "Confusion matrix (rows: true class, columns: predicted class)", "",
              "| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(str(v) for v in confusion[i].tolist()) + " |" for i, n in enumerate(names)]
    markdown.write_text("\n".join(lines) + "\n")
    return [per_class, matrix, markdown]


def summary_values(predictions: Predictions) -> dict[str, float]:
    """Accuracy, macro F1 and the top-label ECE of ``predictions``."""
    confusion = predictions.confusion()
    _, _, f1 = class_rates(confusion)
    accuracy = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
    return {"accuracy": accuracy, "macro_f1": float(f1.mean()),
            "ece": expected_calibration_error(predictions.probs, predictions.target)}


def write_report(predictions: Predictions, folder: Path, stage: str, extra: dict[str, float] | None = None,
                 metrics_csv: Path | None = None) -> tuple[list[Path], str | None]:
    """The tables, and the plots when matplotlib is installed (else a hint to print); returns the files written."""
    files = write_tables(predictions, folder, stage, {**summary_values(predictions), **(extra or {})})
    if importlib.util.find_spec("matplotlib") is None:
        return files, PLOTS_HINT
    from transfer_lit.evaluation.plots import write_plots

    return files + write_plots(predictions, folder, stage, metrics_csv), None
