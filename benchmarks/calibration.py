"""Temperature scaling and a validation-chosen decision threshold on real data, measured on held-out images.

    python benchmarks/calibration.py [--datasets hymenoptera,chest_xray] [--strategies linear_probe,finetune]

ImageNet MobileNetV2 (binary task), one fit per dataset and strategy. The official validation split is cut in
two stratified, seeded halves: one is the validation the model fits its temperature (``model.calibration:
temperature``) and its threshold (``model.threshold: max_f1``) on, the other is held out as the test split the
numbers come from, so nothing is judged on the data it was fitted on. Each row: the test split with the raw
model (T = 1, threshold 0.5) and with the fitted decision (the same weights, so accuracy at threshold 0.5 can
only move through the threshold). Target (issue 12): ECE down >= 30% at unchanged accuracy.

The last line is the JSON summary: ``{"<dataset>/<strategy>": {"ece_raw", "ece_calibrated", "ece_drop",
"acc_raw", "acc_calibrated_t05", "f1_raw", "f1_threshold", "temperature", "threshold", "fit_s"}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from transfer_lit import ImageDataModule, TorchvisionBackbone, TransferModule  # noqa: E402
from transfer_lit.compare import held_out_split  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DATASETS = {"hymenoptera": SHARED / "hymenoptera_256", "chest_xray": SHARED / "chest_xray_pneumonia"}


def test_values(trainer: Trainer, model: TransferModule, data: ImageDataModule) -> dict[str, float]:
    trainer.test(model, datamodule=data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")}


def run(dataset: str, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = held_out_split(DATASETS[dataset], Path(tmp) / "split", args.seed)  # compare's own split
        data = ImageDataModule(root=str(root), batch_size=32, num_workers=args.num_workers, seed=args.seed)
        backbone = TorchvisionBackbone("mobilenet_v2", "IMAGENET1K_V1")
        crop = args.crop
        preprocessing = {"crop_size": crop, "resize_size": round(crop * 256 / 224)}
        model = TransferModule(backbone, num_classes=2, task="binary", class_names=data.class_names,
                               mode=strategy, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
                               preprocessing=preprocessing, calibration="temperature", threshold="max_f1")
        trainer = Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_s = time.perf_counter() - start
        temperature, threshold = model.decision.temperature, model.decision.threshold
        calibrated = test_values(trainer, model, data)
        model.decision.threshold = 0.5
        calibrated_t05 = test_values(trainer, model, data)
        model.decision.temperature = 1.0
        raw = test_values(trainer, model, data)
    return {
        "ece_raw": round(raw["test_ece"], 4), "ece_calibrated": round(calibrated["test_ece"], 4),
        "ece_drop": round(1 - calibrated["test_ece"] / max(raw["test_ece"], 1e-12), 3),
        "acc_raw": round(raw["test_acc"], 4), "acc_calibrated_t05": round(calibrated_t05["test_acc"], 4),
        "acc_threshold": round(calibrated["test_acc"], 4),
        "f1_raw": round(raw["test_f1"], 4), "f1_threshold": round(calibrated["test_f1"], 4),
        "temperature": round(temperature, 4), "threshold": round(threshold, 4), "fit_s": round(fit_s, 1),
        "test_images": len(data.test_dataloader().dataset),  # type: ignore[arg-type]
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="hymenoptera,chest_xray")
    parser.add_argument("--strategies", default="linear_probe,finetune")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--crop", type=int, default=160, help="crop size in px (the resize keeps 256/224)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backbone_lr_mult", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    missing = [name for name in args.datasets.split(",") if not DATASETS.get(name, Path("/nonexistent")).is_dir()]
    if missing:
        parser.error(f"--datasets: {missing} not found (valid: {sorted(DATASETS)}, under {SHARED})")
    torch.set_num_threads(os.cpu_count() or 1)
    summary: dict[str, Any] = {}
    print(f"{'run':<28} {'ECE raw':>8} {'ECE T':>8} {'drop':>6} {'acc raw':>8} {'acc T':>8} {'F1 raw':>7} "
          f"{'F1 thr':>7} {'T':>6} {'thr':>6} {'fit s':>6}")
    for dataset in args.datasets.split(","):
        for strategy in args.strategies.split(","):
            r = summary[f"{dataset}/{strategy}"] = run(dataset, strategy, args)
            print(f"{dataset + '/' + strategy:<28} {r['ece_raw']:8.4f} {r['ece_calibrated']:8.4f} "
                  f"{r['ece_drop']:6.0%} {r['acc_raw']:8.4f} {r['acc_calibrated_t05']:8.4f} {r['f1_raw']:7.4f} "
                  f"{r['f1_threshold']:7.4f} {r['temperature']:6.3f} {r['threshold']:6.3f} {r['fit_s']:6.1f}",
                  flush=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
