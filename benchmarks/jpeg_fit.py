"""Does the loader keep the GPU fed? ``fit`` from a JPEG folder vs from batches already on the device, in one run.

For each model, the same ``TransferModule`` finetune (bf16 on CUDA, the package's defaults otherwise) is
trained twice for ``--warmup`` + 2 x ``--steps`` steps, timed over two windows of ``--steps`` steps:

* ``jpeg``      ``ImageDataModule`` on a folder of JPEGs, its default loader (workers, pinned memory,
                persistent workers, the checkpoint-style RandomResizedCrop + flip);
* ``on_device`` one synthetic batch already on the device, repeated: the model's own speed.

``fed_ratio = jpeg / on_device`` images/s over the second window: 1.0 means the input pipeline costs
nothing; below it, the GPU waits for the loader. The workers fill up to ``workers x prefetch_factor``
batches before the first step, so a loader slower than the GPU can look fast until that head start is
used up: the warm-up (default 60 steps) drains it, and a second window that is slower than the first
(both are printed) would show it had not. A small folder is repeated (symbolic links) so that one
epoch covers every step.

    python benchmarks/jpeg_fit.py                   # ../shared/data/hymenoptera_data (244 train JPEGs), repeated
    python benchmarks/jpeg_fit.py --root DIR        # a folder of class folders (or train/<class>/)
    python benchmarks/jpeg_fit.py --tiny            # CPU smoke test: resnet18, 32 px, batch 4, 2 steps
    python benchmarks/jpeg_fit.py --resized-cache   # the JPEG arm reads data.cache_dir, filled before timing

Needs torch, torchvision, lightning and torchmetrics. Last line: JSON with ``fed_ratio`` per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import Synthetic, WindowTimer  # imports transfer_lit from this checkout if needed
from input_pipeline import IMAGENET, generate
from lightning.pytorch import Trainer

from transfer_lit import ImageDataModule, TorchvisionBackbone, TransferModule
from transfer_lit.data.reader import ImageReader
from transfer_lit.preprocessing import ImagePreprocessing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


def repeat_folder(train: Path, out: Path, times: int) -> Path:
    """``out/train/<class>/<k>_<name>``: each image of ``train/<class>/`` linked ``times`` times."""
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        target = out / "train" / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in (".jpg", ".jpeg", ".png"):
                for k in range(times):
                    (target / f"{k}_{image.name}").symlink_to(image.resolve())
    return out


def fit(args: argparse.Namespace, model: str, data: ImageDataModule | None, p: ImagePreprocessing) -> list[float]:
    """Images/s in each of the two timed windows of one ``Trainer.fit``."""
    cuda = torch.cuda.is_available() and not args.tiny
    torch.manual_seed(0)
    module = TransferModule(TorchvisionBackbone(model, None), num_classes=2, mode="finetune", lr=1e-4)
    marks = [args.warmup, args.warmup + args.steps, args.warmup + 2 * args.steps]
    timer = WindowTimer(marks, torch.cuda.synchronize if cuda else lambda: None)
    trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                      max_steps=marks[-1], limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer])
    if data is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, 3, p.crop_size, p.crop_size, generator=g)
        y = torch.randint(0, 2, (args.batch_size,), generator=g)
        device = "cuda" if cuda else "cpu"
        trainer.fit(module, train_dataloaders=Synthetic(x.to(device), y.to(device), marks[-1]))
    else:
        trainer.fit(module, datamodule=data)
    if not timer.durations:
        raise RuntimeError(f"the timed steps did not complete: {len(timer.times)} of {len(marks)} marks")
    return [args.batch_size * args.steps / seconds for seconds in timer.durations]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=60, help="untimed steps: start-up and the workers' head start")
    parser.add_argument("--steps", type=int, default=100, help="steps in each of the two timed windows")
    parser.add_argument("--repeat", type=int, default=None,
                        help="link each image this many times (default: enough for one epoch of every step)")
    parser.add_argument("--num-workers", type=int, default=None, help="default: the package's own default")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test")
    parser.add_argument("--resized-cache", action="store_true",
                        help="the JPEG arm reads through data.cache_dir (each image resized once, before timing)")
    args = parser.parse_args(argv)
    p = IMAGENET
    if args.tiny:
        args.models, args.batch_size, args.warmup, args.steps = "resnet18", 4, 1, 2
        p = ImagePreprocessing(36, 32, "bilinear", IMAGENET.mean, IMAGENET.std)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        return run(args, p)
    finally:  # this process may go on (the tests call main())
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        torch.backends.cudnn.benchmark = benchmark


def run(args: argparse.Namespace, p: ImagePreprocessing) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as temp:
        if args.root is None and not SHARED.is_dir():
            args.root = generate(Path(temp) / "generated", 16 if args.tiny else 200)
        root = args.root or SHARED
        train = root / "train" if (root / "train").is_dir() else root
        needed = (args.warmup + 2 * args.steps) * args.batch_size
        found = sum(1 for f in train.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        # 0.99 of the images train (val_fraction 0.01 below); one spare batch for drop_last.
        repeat = args.repeat or math.ceil((needed + args.batch_size) / (0.98 * found))
        folder = repeat_folder(train, Path(temp) / "repeated", repeat)
        summary: dict[str, Any] = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu",
            "cores": os.cpu_count(), "root": str(root), "repeat": repeat, "batch_size": args.batch_size,
            "warmup": args.warmup, "steps_per_window": args.steps, "images_per_s": {}, "fed_ratio": {},
        }
        cache_dir = str(Path(temp) / "resized") if args.resized_cache else None
        summary["resized_cache"] = args.resized_cache
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            data = ImageDataModule(root=str(folder), batch_size=args.batch_size, num_workers=args.num_workers,
                                   preprocessing=p, val_fraction=0.01, cache_dir=cache_dir)
            if cache_dir is not None:  # fill it untimed: the windows measure many-epoch reading, not the first pass
                fill = ImageReader(p, cache_dir=cache_dir)
                for path, _ in data.splits["train"]:
                    fill(path)
                samples = data.splits["train"]
                summary["resized_cache_misses"] = sum(not fill.entry(path).is_file() for path, _ in samples)
            else:
                summary["resized_cache_misses"] = None
            start = time.perf_counter()
            jpeg = fit(args, model, data, p)
            on_device = fit(args, model, None, p)
            summary["num_workers"] = data.loader_workers()
            summary["train_images"] = len(data.splits["train"])
            summary["images_per_s"][model] = {"jpeg_windows": [round(v, 1) for v in jpeg],
                                              "on_device_windows": [round(v, 1) for v in on_device]}
            summary["fed_ratio"][model] = round(jpeg[-1] / on_device[-1], 3)
            print(f"{model}: JPEG folder {jpeg[0]:.1f} then {jpeg[1]:.1f} images/s, on-device batches "
                  f"{on_device[0]:.1f} then {on_device[1]:.1f}, fed_ratio {jpeg[1] / on_device[1]:.3f} "
                  f"({summary['num_workers']} workers, {time.perf_counter() - start:.0f} s)", flush=True)
        print(json.dumps(summary), flush=True)
        return summary


if __name__ == "__main__":
    main()
