"""The shipped image recipes, unchanged, under a strong domain shift: pediatric chest X-rays (NORMAL vs PNEUMONIA).

    python benchmarks/domain_shift.py [--recipes linear_probe,finetune,progressive] [--samples_per_class 150]
                                      [--crop 160] [--output_dir outputs/domain_shift]

Each recipe (``configs/<name>.yaml``: ImageNet MobileNetV2, its own epochs, learning rates and schedule) runs through
``transfer-lit fit`` on ``../shared/data/chest_xray_pneumonia`` (train 1,825 images, val 624; grayscale radiographs
stored as RGB) in its own process, with only ``data.root`` and the output folder changed (``--samples_per_class``:
also ``data.samples_per_class``, a seeded draw of that many training images per class; ``--crop``: a smaller crop
than the weights' 224 px, the resize scaled alike, as ``benchmarks/compare_hymenoptera.py`` does). It reports the
validation accuracy after every epoch, the last and the best, macro F1, AUROC and ECE at the last epoch, against the
majority-class baseline of the validation split (0.625). ``progressive.yaml`` must never end at that baseline
while the probe is above it. The last line is JSON: ``{"majority": ..., "recipes": {"<name>": {"val_acc_last",
"val_acc_best", "val_f1_last", "val_auroc_last", "val_ece_last", "val_acc_per_epoch", "wall_s"}}}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray_pneumonia"


def epoch_rows(metrics_csv: Path) -> list[dict[str, float]]:
    """The validation rows of a CSVLogger metrics file, one per epoch, in order."""
    with metrics_csv.open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("val_acc")]
    return [{key: float(value) for key, value in row.items() if value} for row in rows]


def run_recipe(name: str, out: Path, extra: list[str]) -> dict[str, object]:
    root = out / name
    command = [sys.executable, "-m", "transfer_lit", "fit", "--config", str(REPO / "configs" / f"{name}.yaml"),
               "--data.root", str(DATA), "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-4000:]}")
    rows = epoch_rows(sorted(root.glob("lightning_logs/version_*/metrics.csv"))[-1])
    last = rows[-1]
    return {"val_acc_last": round(last["val_acc"], 4), "val_acc_best": round(max(r["val_acc"] for r in rows), 4),
            "val_f1_last": round(last["val_f1"], 4), "val_auroc_last": round(last["val_auroc"], 4),
            "val_ece_last": round(last.get("val_ece", float("nan")), 4),
            "val_acc_per_epoch": [round(r["val_acc"], 4) for r in rows], "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="linear_probe,finetune,progressive")
    parser.add_argument("--samples_per_class", type=int, default=None)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--output_dir", default="outputs/domain_shift")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        parser.error(f"{DATA} not found (the ../shared data folder)")
    val = [len(list((DATA / "val" / label).iterdir())) for label in ("NORMAL", "PNEUMONIA")]
    majority = round(max(val) / sum(val), 4)
    results: dict[str, object] = {}
    for name in args.recipes.split(","):
        extra = [] if args.samples_per_class is None else ["--data.samples_per_class", str(args.samples_per_class)]
        if args.crop is not None:
            resize = round(args.crop * 256 / 224)
            extra += ["--model.preprocessing", f"{{crop_size: {args.crop}, resize_size: {resize}}}"]
        results[name] = run_recipe(name, Path(args.output_dir).resolve(), extra)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    summary = {"majority": majority, "samples_per_class": args.samples_per_class, "crop": args.crop,
               "recipes": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
