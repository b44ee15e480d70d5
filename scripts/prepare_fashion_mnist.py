#!/usr/bin/env python3
"""Build a small, seeded few-shot Fashion-MNIST ImageFolder dataset.

Reads the four official idx files (gzip-compressed or raw), as installed by
the Debian package ``dataset-fashion-mnist`` under
``/usr/share/datasets/fashion-mnist/``, and writes 28x28 grayscale PNGs::

    <out>/train/<class_name>/train_<index>.png   # from the official train split
    <out>/val/<class_name>/test_<index>.png      # from the official test split

``<index>`` is the image's position in its source split, so every file can be
traced back. The same ``--seed`` always selects the same images. The dataset is
first written to a temporary sibling folder and moved into place at the end, so
an interrupted run never leaves a half-written ``<out>``.

Only the standard library, numpy and Pillow are used (torchvision brings both).

Example:
    python scripts/prepare_fashion_mnist.py --out data/fashion_mnist
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
"""Folder names for labels 0..9, in the official label order."""

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
MANIFEST_NAME = "prepared.json"

# (split name in <out>, prefix of the official idx files)
_SPLITS: tuple[tuple[str, str], ...] = (("train", "train"), ("val", "t10k"))


class SourceMissingError(FileNotFoundError):
    """Raised when an idx file cannot be found in the source folder."""


def find_idx_file(source: Path, stem: str) -> Path:
    """Returns the path of an idx file, accepting a raw or a ``.gz`` copy.

    Args:
        source: Folder holding the Fashion-MNIST idx files.
        stem: File name without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.

    Returns:
        The existing file, the raw one preferred.

    Raises:
        SourceMissingError: If neither ``stem`` nor ``stem.gz`` exists.
    """
    for name in (stem, f"{stem}.gz"):
        candidate = source / name
        if candidate.is_file():
            return candidate
    raise SourceMissingError(
        f"Fashion-MNIST file {stem}[.gz] not found in {source}. Install it with "
        f"`apt-get update && apt-get install -y {DEBIAN_PACKAGE}` "
        f"(or run scripts/fetch_offline_assets.sh), or pass --source DIR."
    )


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Reads an unsigned-byte idx file (the MNIST format), gzipped or raw.

    Args:
        path: The idx file; a ``.gz`` suffix means gzip-compressed.

    Returns:
        An array shaped as the header's dimensions, e.g. ``(N, 28, 28)`` for
        images or ``(N,)`` for labels.

    Raises:
        ValueError: If the header is not an unsigned-byte idx header or the
            payload size does not match it.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    header_len = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header_len != expected:
        raise ValueError(
            f"{path}: header says {shape} ({expected} bytes) but payload is "
            f"{len(data) - header_len} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def load_split(source: Path, prefix: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Loads one official split.

    Args:
        source: Folder holding the idx files.
        prefix: ``"train"`` or ``"t10k"``.

    Returns:
        ``(images, labels)`` shaped ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        SourceMissingError: If a file is missing.
        ValueError: If the files are malformed or disagree in length.
    """
    images = read_idx(find_idx_file(source, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx_file(source, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{prefix}: images {images.shape} do not match labels {labels.shape}")
    return images, labels


def sample_per_class(
    labels: npt.NDArray[np.uint8], per_class: int, rng: np.random.Generator
) -> dict[int, list[int]]:
    """Draws ``per_class`` distinct indices for every class, without replacement.

    Args:
        labels: Label of each image.
        per_class: How many images to take from each class.
        rng: Random generator; the draw depends only on its state and ``labels``.

    Returns:
        Class index to sorted list of chosen image indices.

    Raises:
        ValueError: If a class has fewer than ``per_class`` images.
    """
    chosen: dict[int, list[int]] = {}
    for cls in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(labels == cls)
        if per_class > len(pool):
            raise ValueError(f"class {cls} has only {len(pool)} images, asked for {per_class}")
        picked = rng.choice(pool, size=per_class, replace=False)
        chosen[cls] = sorted(int(i) for i in picked)
    return chosen


def prepare(
    source: Path, out: Path, train_per_class: int, val_per_class: int, seed: int
) -> dict[str, int]:
    """Writes the few-shot ImageFolder dataset to ``out``, replacing any old one.

    Args:
        source: Folder holding the Fashion-MNIST idx files.
        out: Destination folder; gets ``train/`` and ``val/`` subfolders and a
            ``prepared.json`` manifest.
        train_per_class: Images per class taken from the official train split.
        val_per_class: Images per class taken from the official test split.
        seed: Seed of the sampling.

    Returns:
        Number of images written per split, e.g. ``{"train": 400, "val": 200}``.

    Raises:
        SourceMissingError: If an idx file is missing.
        ValueError: If the files are malformed, a class is too small, or ``out``
            is a non-empty folder that this script did not write.
    """
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ValueError(f"{out} is not empty and has no {MANIFEST_NAME}; refusing to replace it")
    rng = np.random.default_rng(seed)
    counts = {"train": train_per_class, "val": val_per_class}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written: dict[str, int] = {}
        for split, prefix in _SPLITS:
            images, labels = load_split(source, prefix)
            written[split] = 0
            for cls, indices in sample_per_class(labels, counts[split], rng).items():
                folder = tmp / split / CLASS_NAMES[cls]
                folder.mkdir(parents=True)
                for idx in indices:
                    Image.fromarray(images[idx]).save(folder / f"{prefix}_{idx:05d}.png")
                    written[split] += 1
        manifest = {
            "source": str(source),
            "seed": seed,
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "classes": list(CLASS_NAMES),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(
        description="Write a seeded few-shot Fashion-MNIST ImageFolder dataset "
        "(<out>/{train,val}/<class>/*.png) from the official idx files.",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help=f"folder with the idx files, raw or .gz (default: {DEFAULT_SOURCE}, "
        f"from the Debian package {DEBIAN_PACKAGE})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/fashion_mnist"),
        help="destination folder; one written earlier by this script is replaced "
        "(default: data/fashion_mnist)",
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=40,
        help="images per class from the official train split (default: 40)",
    )
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=20,
        help="images per class from the official test split (default: 20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = parser.parse_args(argv)
    for name in ("train_per_class", "val_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the command line tool.

    Args:
        argv: Arguments without the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The process exit status.
    """
    args = parse_args(argv)
    try:
        written = prepare(
            args.source, args.out, args.train_per_class, args.val_per_class, args.seed
        )
    except (SourceMissingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {written['train']} train + {written['val']} val images "
        f"({len(CLASS_NAMES)} classes) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
