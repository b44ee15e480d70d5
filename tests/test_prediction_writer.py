"""CSVPredictionWriter (transfer_lit.callbacks.prediction_writer): one row per input with every class's probability,
and a failed predict leaves no header-only or truncated file behind."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from transfer_lit import CSVPredictionWriter, TransferModule


class Named(Dataset):
    """``(image, name)`` pairs, as the image data module yields them for predict."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return torch.rand(3, 32, 32), f"img{i}.png"


class FailsAt(TransferModule):
    """Raises in ``predict_step`` at batch ``fail_at`` (a bug in research code, a dying disk...)."""

    fail_at = -1

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in predict_step")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def _predict(tmp_path: Path, fail_at: int) -> Path:
    output = tmp_path / "predictions.csv"
    model = FailsAt(TinyBackbone(), num_classes=3, class_names=["a", "b", "c"])
    model.fail_at = fail_at
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[CSVPredictionWriter(str(output))])
    trainer.predict(model, DataLoader(Named(), batch_size=2), return_predictions=False)
    return output


def test_rows_carry_every_class_probability(tmp_path: Path) -> None:
    with _predict(tmp_path, fail_at=-1).open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "prediction", "probability", "p_a", "p_b", "p_c"]
    assert [r[0] for r in rows[1:]] == [f"img{i}.png" for i in range(6)]
    for row in rows[1:]:
        every = [float(v) for v in row[3:]]
        assert abs(sum(every) - 1) < 1e-5 and float(row[2]) == max(every) and row[1] == "abc"[every.index(max(every))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no temporary file left


def test_a_failure_before_any_row_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "predictions.csv").write_text("earlier results\n")
    with pytest.raises(RuntimeError, match="boom in predict_step"):  # the user's bug keeps its traceback
        _predict(tmp_path, fail_at=0)
    assert (tmp_path / "predictions.csv").read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_a_failure_midway_keeps_the_rows_written_as_partial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        _predict(tmp_path, fail_at=2)
    assert not (tmp_path / "predictions.csv").exists()
    with (tmp_path / "predictions.partial.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == [f"img{i}.png" for i in range(4)]
    assert "predict stopped after 4 rows" in capsys.readouterr().err
