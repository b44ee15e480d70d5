"""Writes ``predict`` results to a CSV file: the input (file or text), predicted class name, its probability, and the
probability of every class."""

from __future__ import annotations

import csv
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from transfer_lit.callbacks.signals import give_back, take_signals
from transfer_lit.checkpoints.io import temp_path
from transfer_lit.data.skipped import describe_skipped
from transfer_lit.errors import storage_error
from transfer_lit.evaluation.calibration import per_class
from transfer_lit.protocols import Classifier, SkipsInputs


class CSVPredictionWriter(BasePredictionWriter):
    """Append one row per input to ``output`` (``output.rank<N>.csv`` on ranks other than 0).

    Rows go to a hidden temporary file beside ``output``, renamed to ``output`` when ``predict`` ends, so a failed
    or interrupted ``predict`` never leaves a header-only or truncated ``output`` (nor replaces an earlier one):
    the rows it did write are kept as ``<output stem>.partial<suffix>``. SIGTERM or Ctrl-C stops ``predict`` after the
    batch being written (a second one at once); the process exits with 143 or 130, as shells report the signal.

    Args:
        output: CSV path; columns ``file`` (or ``text``: the data module's ``prediction_column``), ``prediction``,
            ``probability`` (of the prediction), then ``p_<class>`` for every class (multilabel: each label's own
            probability, ``prediction`` the most probable label). Inputs the data module left out (files that are no
            images, unreadable ones under ``data.bad_images: skip``) are counted in one line at the end and listed
            in ``<output stem>.skipped.csv``.
    """

    def __init__(self, output: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._path: Path | None = None  # the final file
        self._temp: Path | None = None  # where rows go until predict ends
        self._rows = 0
        self._signal: int | None = None  # received SIGTERM / SIGINT, acted on after the current batch
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:  # a second signal: stop now
            raise PredictInterrupted(signum)
        self._signal = signum
        print(f"\n{signal.Signals(signum).name}: predict stops after this batch and keeps the rows written so far",
              file=sys.stderr)

    def _restore_signals(self) -> None:
        give_back(self._previous)
        self._previous = {}

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(self.output)
        if path.is_dir():  # found before any prediction is made, not when the finished file is renamed onto it
            raise ValueError(f"prediction_writer.output={self.output!r} is a folder; give a file name, e.g. "
                             f"{str(path / 'predictions.csv')!r}")
        if trainer.global_rank > 0:
            path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            column = getattr(getattr(trainer, "datamodule", None), "prediction_column", "file")
            names = list(pl_module.class_names) if isinstance(pl_module, Classifier) else []
            temp = temp_path(path)  # hidden, per process, same folder: the checkpoints' own temp naming
            with temp.open("w", newline="") as f:
                csv.writer(f).writerow([column, "prediction", "probability", *(f"p_{n}" for n in names)])
        except OSError as error:  # read-only folder, no permission, full disk: before any prediction is made
            raise storage_error(path, error) from error
        self._path, self._temp, self._rows, self._signal = path, temp, 0, None
        self._previous = take_signals(self._on_signal)  # Lightning's own SIGTERM handler only stops training

    @override
    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        assert self._temp is not None
        probs: torch.Tensor = prediction["probs"]
        names = list(pl_module.class_names) if isinstance(pl_module, Classifier) else []
        if probs.ndim == 1:  # binary: probability of class 1, class 1 at or above the module's decision threshold
            threshold = float(getattr(getattr(pl_module, "decision", None), "threshold", 0.5))
            index = (probs >= threshold).long()
            probs = per_class(probs)
            confidence = probs.gather(1, index[:, None]).squeeze(1)
        else:
            confidence, index = probs.max(dim=1)
        self._rows += len(prediction["paths"])
        with self._temp.open("a", newline="") as f:
            writer = csv.writer(f)
            rows = zip(prediction["paths"], index.tolist(), confidence.tolist(), probs.tolist(), strict=True)
            for path, i, p, every in rows:
                writer.writerow([path, names[i] if i < len(names) else i, f"{p:.6f}", *(f"{q:.6f}" for q in every)])
        if self._signal is not None:
            raise PredictInterrupted(self._signal)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._temp is not None and self._path is not None
        self._restore_signals()
        os.replace(self._temp, self._path)
        self._temp = None
        if trainer.is_global_zero:
            print(f"transfer_lit: predictions written to {self._path}")
        self._report_skipped(getattr(trainer, "datamodule", None))

    def _report_skipped(self, data: Any) -> None:
        """One line naming the first inputs the data module left out, all of them in ``<output stem>.skipped.csv``
        (``file,reason``); an earlier run's list goes when nothing was left out."""
        assert self._path is not None
        skipped = data.take_skipped_inputs() if isinstance(data, SkipsInputs) else {}
        listing = self._path.with_name(f"{self._path.stem}.skipped.csv")
        if not skipped:
            listing.unlink(missing_ok=True)
            return
        with listing.open("w", newline="") as f:
            csv.writer(f).writerows([("file", "reason"), *skipped.items()])
        print(describe_skipped(skipped, self._rows + len(skipped), listing), file=sys.stderr)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Predict failed or was interrupted: keep the rows written so far as ``*.partial*``, or nothing."""
        self._restore_signals()
        if self._temp is None or self._path is None or not self._temp.exists():
            return
        if self._rows == 0:
            self._temp.unlink()
        else:
            partial = self._path.with_name(f"{self._path.stem}.partial{self._path.suffix}")
            os.replace(self._temp, partial)
            print(f"transfer_lit: predict stopped after {self._rows} rows; they are in {partial} ({self._path} is "
                  f"unchanged)", file=sys.stderr)
        self._temp = None


class PredictInterrupted(SystemExit):
    """``predict`` stopped by a signal; exits with 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
