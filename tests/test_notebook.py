"""The tutorial notebook runs top to bottom, offline, in a fresh kernel, on real Fashion-MNIST images and the real
ImageNet MobileNetV2 weights, in its fast mode (``TRANSFER_LIT_NOTEBOOK_FAST=1``: few images, tiny crops)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torchvision

from transfer_lit.backbones.torchvision import weight_file

nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install -e '.[dev]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install -e '.[dev]')")
pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install -e '.[dev]')")
pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist
STRATEGIES = ("linear_probe", "finetune", "progressive")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _prepare_module() -> Any:
    script = ROOT / "scripts" / "prepare_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("prepare_fashion_mnist", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fashion_mnist(tmp_path: Path) -> Path:
    """A tiny few-shot copy (4 train / 2 val images per class) made by the script the README's first command runs."""
    prepare = _prepare_module()
    try:
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            prepare.find_idx_file(FASHION_MNIST, stem)
    except prepare.SourceMissingError as error:
        pytest.skip(f"Fashion-MNIST idx files absent: {error}")
    out = tmp_path / "fashion_mnist"
    prepare.prepare(FASHION_MNIST, out, train_per_class=4, val_per_class=2, seed=0)
    return out


def _mobilenet_v2_weights() -> Path:
    path = weight_file(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
    if not path.is_file():
        pytest.skip(f"{path.name} not in the torch hub cache ({path.parent}); scripts/fetch_offline_assets.sh puts it")
    return path


def _stream_text(notebook: Any) -> str:
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def test_notebook_uses_only_the_public_api() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    imports = [line.strip() for line in code.splitlines() if "transfer_lit" in line]
    assert imports and all(line.startswith("from transfer_lit import ") for line in imports), imports


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not [c for c in notebook.cells if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]


def test_notebook_says_which_command_fetches_missing_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    notebook.cells = notebook.cells[: first + 1]
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        client.execute()
    message = str(error.value)
    assert "FileNotFoundError" in message and str(tmp_path / "nowhere" / "prepared.json") in message
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert f"the MobileNetV2 weights {weights}" in message
    assert "PYTHON=.venv/bin/python bash scripts/fetch_offline_assets.sh" in message


def test_notebook_runs_in_fast_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mobilenet_v2_weights()
    data = _fashion_mnist(tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(data))
    monkeypatch.setenv("TRANSFER_LIT_NOTEBOOK_FAST", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = _stream_text(notebook)
    assert "fast mode: True" in text and f"data: {data.resolve()}" in text

    out = tmp_path / "outputs" / "notebook"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {*STRATEGIES, "focal_probe", "small_cnn"}
    for name, run in results.items():
        for key in ("val_acc", "val_f1", "val_auroc", "val_ece"):
            assert 0.0 <= run[key] <= 1.0, (name, key, run[key])
        assert math.isfinite(run["val_loss"]) and Path(run["checkpoint"]).is_file(), name
        # the metrics table: one row per run, with its metrics as printed
        row = rf"^{name}\s+{run['epochs']}\s+\d+\s+{run['val_acc']:.3f}\s+{run['val_f1']:.3f}\s+{run['val_auroc']:.3f}"
        assert re.search(row, text, re.MULTILINE), (name, row)
    assert re.search(r"^run\s+epochs\s+seconds\s+val_acc\s+val_f1\s+val_auroc\s+val_ece$", text, re.MULTILINE)

    # the preprocessing override reached the MobileNetV2 runs; the small CNN kept its own 28 px
    assert "resolved preprocessing: ImagePreprocessing(resize_size=36, crop_size=32, interpolation='bilinear'" in text
    assert "preprocessing: ImagePreprocessing(resize_size=28, crop_size=28" in text
    # progressive unfreezing thawed the schedule's first phase (the fast mode's 2 epochs reach only that one)
    assert results["progressive"]["thawed"] == ["features.17", "features.18"]
    # the research subclass's hook ran and changed the objective: same probe, same seed, same features
    assert results["focal_probe"]["loss_calls"] > 0
    assert f"FocalLossModule.loss ran {results['focal_probe']['loss_calls']} times" in text
    assert results["focal_probe"]["val_loss"] != pytest.approx(results["linear_probe"]["val_loss"])
    assert 0.0 < results["focal_probe"]["mean_confidence"] <= 1.0 and "focal_probe: accuracy" in text

    best = max(STRATEGIES, key=lambda name: results[name]["val_acc"])
    for png in (out / "learning_curves.png", Path(results[best]["report_dir"]) / "val_confusion.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000, png
    shown = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(shown) >= 3  # the sample images, the learning curves, the confusion matrix
    assert re.search(r"predicted \S+ \(\d\.\d\d\)", text)
