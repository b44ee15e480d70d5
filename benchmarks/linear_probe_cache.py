"""Linear probe epoch time with and without the feature cache (ImageNet MobileNetV2, real JPEGs, CPU).

Both arms fit the same TransferModule (``mode: linear_probe``) on ``../shared/data/hymenoptera_256``
with the weights' own preprocessing, interleaved, ``--repeats`` times each:

* uncached: ``data.cache_features: false`` - every epoch decodes the JPEGs and runs the backbone
  (training images get the default RandomResizedCrop + flip);
* cached: ``data.cache_features: true`` - the backbone runs once per split (the extraction, reported
  on its own; it happens inside the first epoch), then every epoch trains the head on features.

An epoch is one training pass plus its validation pass; the first epoch of every run is left out of
the epoch medians (worker start-up, extraction). Accuracy is the last epoch's ``val_acc``.

    python benchmarks/linear_probe_cache.py        # last line: cache_speedup=<uncached / cached epoch time>
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer, seed_everything

from transfer_lit import ImageDataModule, TorchvisionBackbone, TransferModule
from transfer_lit.speed import keep_freed_memory

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_256"


class EpochTimer(Callback):
    """Wall time of each training epoch including its validation pass."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:  # runs after validation
        self.times.append(time.perf_counter() - self._start)


def fit(cached: bool, args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(0)
    module = TransferModule(TorchvisionBackbone("mobilenet_v2", "IMAGENET1K_V1"), num_classes=2,
                            mode="linear_probe", lr=args.lr)
    data = ImageDataModule(root=str(args.data), batch_size=args.batch_size, num_workers=args.num_workers,
                           cache_features=cached)
    timer = EpochTimer()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[timer])
    start = time.perf_counter()
    trainer.fit(module, data)
    return {"total": time.perf_counter() - start, "epochs": timer.times,
            "val_acc": float(trainer.callback_metrics["val_acc"]), "extraction": data.feature_cache.extraction_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found (the ../shared data folder)")
    keep_freed_memory()  # what the transfer-lit command does; it speeds up the uncached arm

    runs: dict[str, list[dict[str, Any]]] = {"uncached": [], "cached": []}
    for _ in range(args.repeats):
        for arm in runs:
            runs[arm].append(fit(arm == "cached", args))

    print(f"MobileNetV2 IMAGENET1K_V1 linear probe on {args.data.name}, CPU, batch {args.batch_size}, "
          f"{args.epochs} epochs x {args.repeats} interleaved runs per arm")
    print("| arm      | extraction s (once) | epoch s (median, epochs 2+) | fit total s (median) | val_acc per run |")
    print("|----------|---------------------|-----------------------------|----------------------|-----------------|")
    medians = {}
    for arm, results in runs.items():
        medians[arm] = statistics.median(t for r in results for t in r["epochs"][1:])
        extraction = f"{statistics.median(r['extraction'] for r in results):.2f}" if arm == "cached" else "-"
        total = statistics.median(r["total"] for r in results)
        accs = " ".join(f"{r['val_acc']:.3f}" for r in results)
        print(f"| {arm:<8} | {extraction:>19} | {medians[arm]:27.3f} | {total:20.1f} | {accs} |")
    print(f"cache_speedup={medians['uncached'] / medians['cached']:.1f}")


if __name__ == "__main__":
    main()
