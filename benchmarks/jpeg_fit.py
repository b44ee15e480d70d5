"""Does the loader keep the GPU fed? ``fit`` from a JPEG folder vs from batches already on the device, in one run.

For each model, the same ``TransferModule`` finetune (bf16 on CUDA, the package's defaults otherwise) is
trained twice for ``--warmup`` + ``--steps`` steps and timed over the last ``--steps``:

* ``jpeg``      ``ImageDataModule`` on a folder of JPEGs, its default loader (workers, pinned memory,
                persistent workers, the checkpoint-style RandomResizedCrop + flip);
* ``on_device`` one synthetic batch already on the device, repeated: the model's own speed.

``fed_ratio = jpeg / on_device`` images/s: 1.0 means the input pipeline costs nothing; below it, the
GPU waits for the loader. A small folder is repeated ``--repeat`` times (symbolic links) so that one
epoch covers every timed step.

    python benchmarks/jpeg_fit.py                   # ../shared/data/hymenoptera_data (244 train JPEGs) x32
    python benchmarks/jpeg_fit.py --root DIR        # a folder of class folders (or train/<class>/)
    python benchmarks/jpeg_fit.py --tiny            # CPU smoke test: resnet18, 32 px, batch 4, 2 steps

Needs torch, torchvision, lightning and torchmetrics. Last line: JSON with ``fed_ratio`` per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import StepTimer, Synthetic  # imports transfer_lit from this checkout if needed
from input_pipeline import IMAGENET, generate
from lightning.pytorch import Trainer

from transfer_lit import ImageDataModule, TorchvisionBackbone, TransferModule
from transfer_lit.preprocessing import Preprocessing

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


def fit(args: argparse.Namespace, model: str, data: ImageDataModule | None, p: Preprocessing) -> float:
    """Images/s over the timed steps of one ``Trainer.fit``."""
    cuda = torch.cuda.is_available() and not args.tiny
    torch.manual_seed(0)
    module = TransferModule(TorchvisionBackbone(model, None), num_classes=2, mode="finetune", lr=1e-4)
    timer = StepTimer(args.warmup, args.steps, torch.cuda.synchronize if cuda else lambda: None)
    trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                      max_steps=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer])
    if data is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, 3, p.crop_size, p.crop_size, generator=g)
        y = torch.randint(0, 2, (args.batch_size,), generator=g)
        device = "cuda" if cuda else "cpu"
        trainer.fit(module, train_dataloaders=Synthetic(x.to(device), y.to(device), args.warmup + args.steps))
    else:
        trainer.fit(module, datamodule=data)
    if not timer.seconds:
        raise RuntimeError("the timed steps did not complete: make --repeat larger")
    return args.batch_size * args.steps / timer.seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=32, help="link each image this many times")
    parser.add_argument("--num-workers", type=int, default=None, help="default: the package's own default")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test")
    args = parser.parse_args(argv)
    p = IMAGENET
    if args.tiny:
        args.models, args.batch_size, args.warmup, args.steps, args.repeat = "resnet18", 4, 1, 2, 1
        p = Preprocessing(36, 32, "bilinear", IMAGENET.mean, IMAGENET.std)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as temp:
        if args.root is None and not SHARED.is_dir():
            args.root = generate(Path(temp) / "generated", 16 if args.tiny else 200)
        root = args.root or SHARED
        train = root / "train" if (root / "train").is_dir() else root
        folder = repeat_folder(train, Path(temp) / "repeated", args.repeat)
        summary: dict[str, Any] = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu",
            "cores": os.cpu_count(), "root": str(root), "repeat": args.repeat, "batch_size": args.batch_size,
            "images_per_s": {}, "fed_ratio": {},
        }
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            data = ImageDataModule(root=str(folder), batch_size=args.batch_size, num_workers=args.num_workers,
                                   preprocessing=p, val_fraction=0.01)
            start = time.perf_counter()
            jpeg = fit(args, model, data, p)
            on_device = fit(args, model, None, p)
            summary["images_per_s"][model] = {"jpeg": round(jpeg, 1), "on_device": round(on_device, 1)}
            summary["fed_ratio"][model] = round(jpeg / on_device, 3)
            print(f"{model}: JPEG folder {jpeg:.1f} images/s, on-device batches {on_device:.1f} images/s, "
                  f"fed_ratio {jpeg / on_device:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
