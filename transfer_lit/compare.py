"""``transfer-lit compare``: which strategy wins on my data, judged on held-out data, over seeds.

    transfer-lit compare --data.root images/ [--strategies linear_probe,finetune,progressive] [--seeds 3]
                         [--epochs 5] [--max_minutes M] [--patience N] [--backbone_lr_mults 0.01,0.1,1]
                         [--output_dir outputs/compare] [-- fit args]
    transfer-lit compare --data.root images/ --samples_per_class 1,5,10,40 ...    # the few-shot protocol

Each strategy runs its shipped recipe (``configs/<strategy>.yaml``, or ``--recipe STRATEGY=FILE``) through
``transfer-lit fit`` on one fixed split: ``train/`` trains, ``val/`` selects (the checkpoint of the best
validation accuracy, and the backbone LR multiplier), and ``test/`` reports. A folder with only ``train/`` and
``val/`` has its ``val/`` cut in two seeded, stratified halves (selection, held-out), so selection and reporting
never share an image. The multiplier search (fine-tune and progressive; the probe has no backbone LR) runs on the
first seed only and is judged on the selection split; the chosen value then runs on every seed.

The budget of every fit is the same: at most ``--epochs`` epochs, and with ``--max_minutes`` at most that wall time
(Lightning's ``trainer.max_time``; the run then ends after the batch being trained, and a time budget makes
results depend on the machine's speed). ``--patience N`` also stops a fit when the selection accuracy has not
improved for N epochs (Lightning's ``EarlyStopping`` on ``val_acc``); either way the checkpoint of the best selection
accuracy is the one tested. ``epochs_mean`` in the summary says how many epochs ran.

The pick: the strategy with the highest mean selection accuracy; one within its standard deviation that took
less wall time wins instead (the cheaper of two equals). Written to ``--output_dir``: ``compare.json`` (held-out
mean +- std of accuracy, macro F1, AUROC, ECE; wall time), ``compare.md``, ``compare.png`` (with matplotlib) and
``best.yaml``, the winning recipe, ready for ``transfer-lit fit --config best.yaml``. The same seeds give the
same JSON, wall times aside. With ``--samples_per_class``, the comparison runs at each k (a new draw of k images
per class for each seed) and ``few_shot.json`` / ``.md`` / ``.png`` give the held-out accuracy per k with its 95%
interval over seeds (Student's t).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

RECIPES = {"linear_probe": "linear_probe.yaml", "finetune": "finetune.yaml", "progressive": "progressive.yaml",
           "scratch": "finetune.yaml"}
SEARCHED = ("finetune", "progressive")
IMAGES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
REPORTED = ("acc", "f1", "auroc", "ece")


def held_out_split(root: Path, folder: Path, seed: int) -> Path:
    """``root`` itself when it has ``test/``; else ``folder`` with ``train/`` linked and ``val/`` cut in two."""
    if (root / "test").is_dir():
        return root
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ValueError(f"compare --data.root={str(root)!r} needs train/ and val/ class folders (and optionally "
                         f"test/): selection and reporting use separate images")
    if folder.exists():
        return folder
    (folder / "train").parent.mkdir(parents=True, exist_ok=True)
    (folder / "train").symlink_to((root / "train").resolve())
    rng = random.Random(seed)
    for class_dir in sorted(p for p in (root / "val").iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGES)
        rng.shuffle(files)
        for split, chosen in (("val", files[: len(files) // 2]), ("test", files[len(files) // 2:])):
            (folder / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for file in chosen:
                (folder / split / class_dir.name / file.name).symlink_to(file.resolve())
    return folder


def fit_and_test(recipe: Path, root: Path, out: Path, seed: int, epochs: int, mult: float | None,
                 scratch: bool, extra: list[str]) -> dict[str, Any]:
    """One ``fit`` of ``recipe``, then ``test`` of its best-validation checkpoint on the held-out split."""
    from transfer_lit.cli import build_cli

    args = ["fit", "--config", str(recipe), "--data.root", str(root), "--seed_everything", str(seed),
            "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.deterministic", "true"]
    if mult is not None:
        args += ["--model.backbone_lr_mult", str(mult)]
    if scratch:
        args += ["--model.backbone.init_args.weights", "null", "--model.backbone_lr_mult", "1.0"]
    start = time.perf_counter()
    cli = build_cli(args + extra)
    wall = time.perf_counter() - start
    ran = cli.trainer.current_epoch
    selection = float(cli.trainer.checkpoint_callback.best_model_score or 0.0)  # type: ignore[union-attr]
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    metrics = cli.trainer.callback_metrics
    # An undefined metric (AUROC of a held-out split that lacks a class: NaN) is None: JSON's null, "n/a" in the table.
    result = {k: round(v, 4) if math.isfinite(v := float(metrics[f"test_{k}"])) else None
              for k in REPORTED if f"test_{k}" in metrics}
    return {**result, "selection_acc": round(selection, 4), "wall_s": round(wall, 1), "epochs": ran}


def summarize(runs: dict[str, list[dict[str, Any]]], mults: dict[str, float | None]) -> dict[str, Any]:
    """Mean and std per strategy, and the pick (see the module's docstring)."""
    strategies: dict[str, Any] = {}
    for name, results in runs.items():
        row: dict[str, Any] = {}
        for key in (*REPORTED, "selection_acc"):
            values = [r[key] for r in results if r.get(key) is not None]
            if any(key in r for r in results):
                row[f"{key}_mean"] = round(statistics.fmean(values), 4) if values else None
                row[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else (0.0 if values else None)
        row["accuracy_mean"], row["accuracy_std"] = row.pop("acc_mean", None), row.pop("acc_std", None)
        row["wall_s"] = round(sum(r["wall_s"] for r in results) / len(results), 1)
        row["epochs_mean"] = round(statistics.fmean(r.get("epochs", 0) for r in results), 2)
        row["backbone_lr_mult"], row["seeds"] = mults.get(name), len(results)
        strategies[name] = row
    best = max(strategies, key=lambda s: strategies[s]["selection_acc_mean"])
    top = strategies[best]
    equals = [s for s, r in strategies.items()
              if top["selection_acc_mean"] - r["selection_acc_mean"] <= top["selection_acc_std"]]
    pick = min(equals, key=lambda s: strategies[s]["wall_s"])
    why = ("the highest mean selection accuracy" if pick == best else
           f"within the std of {best}'s mean selection accuracy, and less wall time")
    return {"pick": pick, "why": why, "rule": "highest mean selection accuracy; within its std, the least wall time",
            "strategies": strategies}


def write_outputs(summary: dict[str, Any], out: Path, recipe: Path, root: Path, epochs: int) -> None:
    """compare.json / .md / .png and best.yaml."""
    (out / "compare.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    head = "| strategy | held-out acc | macro F1 | AUROC | ECE | selection acc | backbone LR mult | wall s |"
    lines = [f"# compare: pick **{summary['pick']}** ({summary['why']})", "", head, "|---" * 8 + "|"]
    for name, r in summary["strategies"].items():
        cells = ["n/a" if r.get(f"{k}_mean") is None else f"{r[f'{k}_mean']:.4f}" for k in ("f1", "auroc", "ece")]
        lines.append(f"| {name} | {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | {' | '.join(cells)} | "
                     f"{r['selection_acc_mean']:.4f} | {r['backbone_lr_mult']} | {r['wall_s']} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    pick = summary["strategies"][summary["pick"]]
    # The winner's own config.yaml (seed 0): every fit argument given to compare is in it, not only the recipe's.
    saved = sorted((out / "runs" / summary["pick"] / f"mult{pick['backbone_lr_mult']}" / "seed0").rglob("config.yaml"))
    config = yaml.safe_load((saved[0] if saved else recipe).read_text())
    if not saved:
        config.setdefault("data", {})["root"] = str(root)
        config.setdefault("trainer", {})["max_epochs"] = epochs
        if pick["backbone_lr_mult"] is not None:
            config.setdefault("model", {})["backbone_lr_mult"] = pick["backbone_lr_mult"]
    config.setdefault("trainer", {})["default_root_dir"] = "outputs/best"
    # The recipe part only (not fit's own ckpt_path / weights_only, nor the unset top-level optimizer): a file for
    # `fit --config` and for TransferCLI(run=False) alike.
    config = {k: config[k] for k in ("seed_everything", "trainer", "model", "data") if k in config}
    header = f"# The pick of transfer-lit compare ({summary['pick']}): transfer-lit fit --config best.yaml\n"
    (out / "best.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    try:
        from transfer_lit.evaluation.plots import subplots
    except ImportError:
        print("transfer-lit compare: pip install 'transfer-lit[plots]' (matplotlib) for compare.png")
        return
    names = list(summary["strategies"])
    fig, ax = subplots(figsize=(1.6 * len(names) + 2, 4))
    means = [summary["strategies"][n]["accuracy_mean"] for n in names]
    stds = [summary["strategies"][n]["accuracy_std"] for n in names]
    ax.bar(names, means, yerr=stds, capsize=6, color=["tab:green" if n == summary["pick"] else "tab:blue"
                                                      for n in names])
    ax.set(ylabel="held-out accuracy (mean +- std over seeds)", ylim=(0, 1), title="transfer-lit compare")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)


def compare(root: str, strategies: list[str], seeds: int = 3, epochs: int = 5,
            backbone_lr_mults: tuple[float, ...] = (0.01, 0.1, 1.0), output_dir: str = "outputs/compare",
            recipes: dict[str, str] | None = None, extra: list[str] | None = None,
            samples_per_class: int | None = None, max_minutes: float | None = None,
            patience: int | None = None) -> dict[str, Any]:
    """Run the comparison (the module's docstring) and return the summary written to ``compare.json``.

    ``samples_per_class``: train on that many images per class, drawn anew for each seed (``data.seed``).
    ``max_minutes`` / ``patience``: the budget of every fit besides ``epochs`` (:func:`budget_args`).
    """
    unknown = [s for s in strategies if s not in RECIPES]
    if unknown:
        raise ValueError(f"compare --strategies: unknown {unknown}; valid: {sorted(RECIPES)}")
    if seeds < 1 or epochs < 1:
        raise ValueError(f"compare: --seeds and --epochs must be >= 1, got {seeds} and {epochs}")
    budget = budget_args(max_minutes, patience)
    configs = Path(__file__).resolve().parents[1] / "configs"
    files = {s: Path((recipes or {}).get(s) or configs / RECIPES[s]) for s in strategies}
    missing = {s: str(f) for s, f in files.items() if not f.is_file()}
    if missing:
        raise FileNotFoundError(f"compare: recipe file(s) not found {missing}; give --recipe STRATEGY=FILE")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = held_out_split(Path(root), out / "split", seed=0)
    runs: dict[str, list[dict[str, Any]]] = {}
    mults: dict[str, float | None] = {}
    search: dict[str, dict[str, float]] = {}
    searching = len(backbone_lr_mults) > 1
    total = sum(len(backbone_lr_mults) + seeds - 1 if s in SEARCHED and searching else seeds for s in strategies)
    done = [0]
    for strategy in strategies:
        def run(seed: int, mult: float | None, strategy: str = strategy) -> dict[str, float]:
            done[0] += 1
            print(f"transfer-lit compare: run {done[0]}/{total}: {strategy}, backbone_lr_mult {mult}, seed {seed}",
                  flush=True)
            folder = out / "runs" / strategy / f"mult{mult}" / f"seed{seed}"
            shots = [] if samples_per_class is None else ["--data.samples_per_class", str(samples_per_class),
                                                          "--data.seed", str(seed)]
            return fit_and_test(files[strategy], data, folder, seed, epochs, mult, strategy == "scratch",
                                [*budget, *(extra or []), *shots])

        if strategy in SEARCHED and searching:
            tried = {m: run(0, m) for m in backbone_lr_mults}
            search[strategy] = {str(m): r["selection_acc"] for m, r in tried.items()}
            chosen = max(tried, key=lambda m: tried[m]["selection_acc"])
            mults[strategy] = chosen
            runs[strategy] = [tried[chosen]] + [run(s, chosen) for s in range(1, seeds)]
        else:
            mults[strategy] = backbone_lr_mults[0] if strategy in SEARCHED else None
            runs[strategy] = [run(s, mults[strategy]) for s in range(seeds)]
    summary = {**summarize(runs, mults), "search": search,  # selection accuracy of each multiplier (seed 0)
               "budget": {"epochs": epochs, "max_minutes": max_minutes, "patience": patience}}
    write_outputs(summary, out, files[summary["pick"]], data, epochs)
    return summary


def budget_args(max_minutes: float | None, patience: int | None) -> list[str]:
    """``fit`` arguments for a wall-time budget (``trainer.max_time``) and early stopping on the selection accuracy."""
    args: list[str] = []
    if max_minutes is not None:
        if max_minutes <= 0:
            raise ValueError(f"compare --max_minutes must be > 0, got {max_minutes}")
        seconds = max(1, round(max_minutes * 60))
        args += ["--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]
    if patience is not None:
        if patience < 1:
            raise ValueError(f"compare --patience must be >= 1 epoch, got {patience}")
        args += ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                 "--trainer.callbacks.monitor=val_acc", "--trainer.callbacks.mode=max",
                 f"--trainer.callbacks.patience={patience}"]
    return args


def positive(kind: type[float] | type[int]) -> Callable[[str], Any]:
    """An argparse ``type``: a number of ``kind`` above 0, else the value received and what is valid."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value
    return parse


def listed(item: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type``: comma-separated values, each parsed by ``item``."""
    return lambda text: tuple(item(part) for part in text.split(","))


def recipe_file(text: str) -> tuple[str, str]:
    """``--recipe STRATEGY=FILE`` as ``(strategy, file)``."""
    strategy, equals, file = text.partition("=")
    if not equals or not strategy or not file:
        raise argparse.ArgumentTypeError(f"{text!r} is not STRATEGY=FILE (e.g. finetune=my_finetune.yaml); "
                                         f"strategies: {sorted(RECIPES)}")
    return strategy, file


def main(argv: list[str]) -> dict[str, Any]:
    """``transfer-lit compare ...``: prints the table and the winning recipe, last line the JSON summary."""
    parser = argparse.ArgumentParser(prog="transfer-lit compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--strategies", default="linear_probe,finetune,progressive")
    parser.add_argument("--seeds", type=positive(int), default=3)
    parser.add_argument("--epochs", type=positive(int), default=5)
    parser.add_argument("--max_minutes", type=positive(float), default=None,
                        help="wall-time budget of every fit, in minutes")
    parser.add_argument("--patience", type=positive(int), default=None,
                        help="stop a fit after this many epochs without a better selection accuracy")
    parser.add_argument("--backbone_lr_mults", type=listed(positive(float)), default=(0.01, 0.1, 1.0),
                        metavar="M[,M...]")
    parser.add_argument("--output_dir", default="outputs/compare")
    parser.add_argument("--recipe", action="append", type=recipe_file, default=[], metavar="STRATEGY=FILE")
    parser.add_argument("--samples_per_class", type=listed(positive(int)), default=None, metavar="K[,K...]",
                        help="few-shot protocol: compare at each k training images per class (e.g. 1,5,10,40)")
    own, extra = parser.parse_known_args(argv)
    options = {"epochs": own.epochs, "max_minutes": own.max_minutes, "patience": own.patience,
               "backbone_lr_mults": own.backbone_lr_mults, "recipes": dict(own.recipe),
               "extra": [a for a in extra if a != "--"]}
    if own.samples_per_class:
        from transfer_lit.few_shot import few_shot  # it runs compare() at each k

        result = few_shot(own.root, list(own.samples_per_class), own.strategies.split(","),
                          own.seeds, own.output_dir, **options)
        print((Path(own.output_dir) / "few_shot.md").read_text())
        print(json.dumps(result))
        return result
    summary = compare(own.root, own.strategies.split(","), own.seeds, output_dir=own.output_dir, **options)
    print((Path(own.output_dir) / "compare.md").read_text())
    print(f"winning recipe: {Path(own.output_dir) / 'best.yaml'}")
    print(json.dumps(summary))
    return summary
