"""Training input pipeline throughput: transfer_lit's loader vs a hand-written torchvision one, in one run.

Both arms decode the same JPEG folder with PIL and apply the same training transform (the checkpoint's
RandomResizedCrop + flip, scaled and normalized), with the same batch size, worker count, pinned memory
(when CUDA is there) and persistent workers:

* ``torchvision``  ``torchvision.datasets.ImageFolder`` + ``DataLoader``: what a hand-written script does;
* ``transfer_lit`` ``ImageDataModule.train_dataloader()`` (bad-image handling, skipping collate) with its
                   default ``normalize_on_device``: the workers deliver uint8 batches; the scaling and
                   normalization that a training run does on its device is charged here to this process,
                   on the CPU (``ImageDataModule.normalize``), which is the conservative side;
* ``transfer_lit_normalize_in_workers`` the same with ``normalize_on_device=False`` (float32 batches);
* ``transfer_lit_full_decode`` the default with ``reduced_decode=False``: what decoding large JPEGs at a
                   reduced DCT scale saves;
* ``transfer_lit_resized_cache`` the default with ``cache_dir`` (a temp folder filled by the warm-up pass):
                   every image read as the raw pixels of its resize, not decoded.

Each arm runs ``--epochs`` passes per worker count, interleaved, after one warm-up pass (worker start-up
and the page cache), and reports images/s. Divide a GPU's training throughput by the images/s per worker
to see how many loader cores it needs.

    python benchmarks/input_pipeline.py                  # ../shared/data/hymenoptera_data if present
    python benchmarks/input_pipeline.py --root DIR       # a folder of class folders (or train/<class>/)
    python benchmarks/input_pipeline.py --generate 400   # no data: writes 400 500x375 JPEGs to a temp dir

Second-last line: ``input_pipeline_ratio=<transfer_lit images/s / torchvision images/s>`` (defaults, most
workers); last line: ``photo_loader_speedup=<transfer_lit_resized_cache / torchvision>`` (most workers), what a
many-epoch run on a folder of full-size photos gets with ``data.cache_dir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

if importlib.util.find_spec("transfer_lit") is None:  # a GPU box with only torch/torchvision/lightning/torchmetrics
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer_lit import ImageDataModule
from transfer_lit.preprocessing import ImagePreprocessing, build_train_transform

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"
# ImageNet's own checkpoints' eval recipe (MobileNetV2 IMAGENET1K_V1, ResNet-50 IMAGENET1K_V1).
IMAGENET = ImagePreprocessing(256, 224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def generate(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` noisy 500x375 JPEGs (ImageNet's typical size) in two class folders."""
    rng = random.Random(seed)
    for i in range(count):
        folder = root / "train" / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        image = Image.fromarray(noise.numpy())
        image.save(folder / f"{i}.jpg", quality=rng.randint(80, 95))
    return root


Finish = Callable[[torch.Tensor], torch.Tensor] | None


def images_per_s(loader: DataLoader, epochs: int, finish: Finish = None) -> float:
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            if finish is not None:
                x = finish(x)
            count += len(x)
    return count / (time.perf_counter() - start)


def _measure(argv: list[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--generate", type=int, default=0, help="write this many JPEGs to a temp dir and use them")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    temp = tempfile.TemporaryDirectory() if args.generate or (args.root is None and not SHARED.is_dir()) else None
    root = generate(Path(temp.name), args.generate or 200) if temp is not None else (args.root or SHARED)
    train = root / "train" if (root / "train").is_dir() else root
    torch.set_num_threads(1)  # the loader's work is in the workers (or, with 0 workers, this one process)
    names = ("torchvision", "transfer_lit", "transfer_lit_normalize_in_workers", "transfer_lit_full_decode",
             "transfer_lit_resized_cache")
    results: dict[str, dict[int, list[float]]] = {name: {} for name in names}
    cache = tempfile.TemporaryDirectory()
    workers = [int(w) for w in args.workers.split(",")]
    pin = torch.cuda.is_available()
    for w in workers:
        baseline = DataLoader(ImageFolder(str(train), transform=build_train_transform(IMAGENET)), shuffle=True,
                              batch_size=args.batch_size, num_workers=w, pin_memory=pin, persistent_workers=w > 0)
        arms: dict[str, tuple[DataLoader, Finish]] = {
            "torchvision": (baseline, None)}
        variants: dict[str, dict[str, object]] = {
            "transfer_lit": {}, "transfer_lit_normalize_in_workers": {"normalize_on_device": False},
            "transfer_lit_full_decode": {"reduced_decode": False},
            "transfer_lit_resized_cache": {"cache_dir": cache.name}}
        for name, kwargs in variants.items():
            data = ImageDataModule(root=str(root), batch_size=args.batch_size, num_workers=w, preprocessing=IMAGENET,
                                   val_fraction=0.01 if not (root / "val").is_dir() else 0.2, **kwargs)  # type: ignore[arg-type]
            data.setup("fit")
            on_device = kwargs.get("normalize_on_device", True)
            arms[name] = (data.train_dataloader(), data.normalize if on_device else None)
        for loader, finish in arms.values():  # warm-up: worker start-up, page cache
            images_per_s(loader, 1, finish)
        for _ in range(args.repeats):
            for name, (loader, finish) in arms.items():
                results[name].setdefault(w, []).append(images_per_s(loader, args.epochs, finish))
        print(f"workers={w}: " + ", ".join(f"{n} {statistics.median(r[w]):.1f} images/s" for n, r in results.items()),
              flush=True)
    summary = {
        "root": str(root), "images": len(ImageFolder(str(train))), "batch_size": args.batch_size,
        "images_per_s": {n: {w: round(statistics.median(v), 1) for w, v in r.items()} for n, r in results.items()},
    }
    most = max(workers)
    ratio = statistics.median(results["transfer_lit"][most]) / statistics.median(results["torchvision"][most])
    def speedup(name: str, over: str) -> float:
        return round(statistics.median(results[name][most]) / statistics.median(results[over][most]), 3)

    summary["device_normalize_speedup"] = speedup("transfer_lit", "transfer_lit_normalize_in_workers")
    summary["reduced_decode_speedup"] = speedup("transfer_lit", "transfer_lit_full_decode")
    summary["photo_loader_speedup"] = speedup("transfer_lit_resized_cache", "torchvision")
    if most > 0:
        summary["images_per_s_per_worker"] = round(statistics.median(results["transfer_lit"][most]) / most, 1)
    print(json.dumps(summary))
    print(f"input_pipeline_ratio={ratio:.3f}")
    print(f"photo_loader_speedup={summary['photo_loader_speedup']:.3f}")
    cache.cleanup()
    if temp is not None:
        temp.cleanup()
    return summary


def keeping_threads(measure: Callable[[list[str] | None], dict[str, object]], argv: list[str] | None
                    ) -> dict[str, object]:
    """``measure(argv)``, then torch's thread count as it was: this process may go on (the tests call main())."""
    threads = torch.get_num_threads()
    try:
        return measure(argv)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> dict[str, object]:
    return keeping_threads(_measure, argv)


if __name__ == "__main__":
    main()
