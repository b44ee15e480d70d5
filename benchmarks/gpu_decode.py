"""JPEG decode + RandomResizedCrop to 224: one CPU core (PIL, as a loader worker does it) vs nvJPEG on the GPU.

Both arms read the same files' bytes from memory and produce the same thing: a 3x224x224 uint8 image,
randomly resized-cropped (scale 0.08-1, bilinear, antialiased) and maybe flipped.

* ``cpu_core``  PIL decode + torchvision's RandomResizedCrop, one image at a time in this one process:
                the work of one DataLoader worker, so ``images/s x cores`` bounds a CPU loader;
* ``gpu``       ``torchvision.io.decode_jpeg(..., device="cuda")`` on batches, then the crop and resize on
                the GPU, timed to a synchronisation.

It answers whether GPU-side decode is worth building: ``gpu_vs_cpu_cores`` compares the GPU arm with
``cpu_core x --cores`` (default: this machine's core count minus one, the loader's default share). Both
are bounds, not a loader's speed: the CPU side assumes linear scaling over cores and leaves out file
reads, normalisation and collation (an upper bound); the GPU side crops image by image from Python (a
lower bound for a batched GPU crop).

    python benchmarks/gpu_decode.py                 # ../shared/data/hymenoptera_data if present
    python benchmarks/gpu_decode.py --root DIR      # any folder of JPEGs (searched recursively)
    python benchmarks/gpu_decode.py --generate 64   # no data: 64 noisy 500x375 JPEGs in a temp dir

On a machine without CUDA it measures the CPU arm only. Last line: JSON with ``gpu_vs_cpu_cores``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import generate, keeping_threads  # (the same synthetic JPEGs as the loader benchmark)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"
SIZE = 224


def crop_and_flip() -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()])


def cpu_core(payloads: list[bytes], passes: int) -> float:
    """Images/s of PIL decode + crop in this process (one loader worker's work)."""
    transform = crop_and_flip()

    def one_pass(items: list[bytes]) -> None:
        for payload in items:
            image = Image.open(io.BytesIO(payload)).convert("RGB")
            transform(v2.functional.pil_to_tensor(image))

    one_pass(payloads[:8])  # warm-up: first calls, allocator
    start = time.perf_counter()
    for _ in range(passes):
        one_pass(payloads)
    return passes * len(payloads) / (time.perf_counter() - start)


def _nvjpeg_decodes(data: torch.Tensor) -> bool:
    try:
        decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
        return True
    except RuntimeError:
        return False


def gpu(payloads: list[bytes], passes: int, batch_size: int) -> tuple[float, int]:
    """Images/s of batched nvJPEG decode + crop on the GPU, after one warm-up pass; files nvJPEG refused."""
    transform = crop_and_flip()
    every = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads]
    data = [d for d in every if _nvjpeg_decodes(d)]  # a file nvJPEG refuses would fail its whole batch

    def one_pass() -> None:
        for i in range(0, len(data), batch_size):
            images = decode_jpeg(data[i : i + batch_size], mode=ImageReadMode.RGB, device="cuda")
            torch.stack([transform(image) for image in images])

    one_pass()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(passes):
        one_pass()
    torch.cuda.synchronize()
    return passes * len(data) / (time.perf_counter() - start), len(every) - len(data)


def _measure(argv: list[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--generate", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cores", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    temp = tempfile.TemporaryDirectory() if args.generate or (args.root is None and not SHARED.is_dir()) else None
    root = generate(Path(temp.name), args.generate or 64) if temp is not None else (args.root or SHARED)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    payloads = [f.read_bytes() for f in files]
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one loader worker's share
    summary: dict[str, object] = {"root": str(root), "images": len(payloads), "cores": args.cores}
    per_core = cpu_core(payloads, args.passes)
    summary["cpu_core_images_per_s"] = round(per_core, 1)
    summary["cpu_cores_images_per_s"] = round(per_core * args.cores, 1)
    if torch.cuda.is_available():
        summary["device"] = torch.cuda.get_device_name(0)
        on_gpu, refused = gpu(payloads, args.passes, args.batch_size)
        summary["gpu_images_per_s"] = round(on_gpu, 1)
        summary["gpu_refused_files"] = refused
        summary["gpu_vs_cpu_cores"] = round(on_gpu / (per_core * args.cores), 3)
    else:
        summary["gpu_vs_cpu_cores"] = None
        summary["skipped"] = "no CUDA: GPU arm not measured"
    if temp is not None:
        temp.cleanup()
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict[str, object]:
    return keeping_threads(_measure, argv)


if __name__ == "__main__":
    main()
