"""Which image files make up each split: class folders, CSV files, a stratified hold-out, a few-shot subsample."""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from transfer_lit.data.decode import IMAGE_EXTENSIONS, Sample


def list_images(folder: Path, ignored: list[Path] | None = None) -> list[Path]:
    """Image files under ``folder``; other non-hidden files (``.gif``, ``.txt``...) are appended to ``ignored``."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if ignored is not None:
        ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)


def describe_ignored(ignored: Sequence[Path]) -> str:
    """``"; ignored 1 file(s) whose extension is not in [...]: {'.gif': 1}, e.g. [...]"`` for the data log line."""
    if not ignored:
        return ""
    by_extension = dict(sorted(Counter(p.suffix.lower() or "(none)" for p in ignored).items()))
    return (f"; ignored {len(ignored)} file(s) whose extension is not in {list(IMAGE_EXTENSIONS)}: {by_extension}, "
            f"e.g. {[str(p) for p in sorted(ignored)[:3]]}")


def scan_class_folders(root: Path, key: str, ignored: list[Path] | None = None) -> dict[str, list[Path]]:
    """``{class name: image paths}`` of an ImageFolder-style directory, with clear errors.

    Files with other extensions are left out, as ImageFolder does, and appended to ``ignored``.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{key}={str(root)!r}: no such directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{key}={str(root)!r} has no class sub-folders; expected {root}/<class name>/<image files>")
    found = {c: list_images(root / c, ignored) for c in classes}
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise ValueError(
            f"{key}={str(root)!r}: class folder(s) {empty} contain no images with extensions {list(IMAGE_EXTENSIONS)}"
        )
    return found


def read_csv(path: Path, key: str) -> list[tuple[Path, str]]:
    """Rows ``(path, label)`` of a CSV with a ``path,label`` header; relative paths are resolved against its folder."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{key}={str(path)!r} must have a header with columns 'path' and 'label', "
                             f"got {reader.fieldnames}")
        rows = [(path.parent / row["path"], row["label"]) for row in reader]
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{key}={str(path)!r} lists {len(missing)} file(s) that do not exist, e.g. {missing[:3]}")
    return rows


def stratified_split(by_class: dict[str, list[Path]], fraction: float, seed: int) -> tuple[dict, dict]:
    """Hold out ``fraction`` of every class (at least one image where the class has two or more)."""
    rng = random.Random(seed)
    train, val = {}, {}
    for name, files in by_class.items():
        files = list(files)
        rng.shuffle(files)
        n_val = min(len(files) - 1, max(1, round(fraction * len(files)))) if len(files) > 1 else 0
        val[name], train[name] = sorted(files[:n_val]), sorted(files[n_val:])
    return train, val


def few_shot(by_class: dict[str, list[Path]], samples_per_class: int, seed: int, key: str) -> dict[str, list[Path]]:
    """Seeded subsample of ``samples_per_class`` images per class."""
    short = {c: len(f) for c, f in by_class.items() if len(f) < samples_per_class}
    if short:
        raise ValueError(f"{key}={samples_per_class} but these classes have fewer training images: {short}")
    rng = random.Random(seed)
    return {c: sorted(rng.sample(list(files), samples_per_class)) for c, files in by_class.items()}


def index_splits(root: str | None, train_csv: str | None, val_csv: str | None, test_csv: str | None,
                 val_fraction: float, samples_per_class: int | None, seed: int
                 ) -> tuple[list[str], dict[str, list[Sample]]]:
    """``(class names, {split: [(path, class index)]})`` of ``ImageDataModule``'s arguments of the same names."""
    folders: dict[str, dict[str, list[Path]]] = {}
    ignored: list[Path] = []
    if root is not None:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"data.root={root!r}: no such directory")
        if (base / "train").is_dir():
            for split in ("train", "val", "test"):
                if (base / split).is_dir():
                    folders[split] = scan_class_folders(base / split, f"data.root ({split}/)", ignored)
            if "val" not in folders:
                folders["train"], folders["val"] = stratified_split(folders["train"], val_fraction, seed)
        elif (base / "val").is_dir() or (base / "test").is_dir():
            raise FileNotFoundError(f"data.root={root!r} has val/ or test/ but no train/ folder")
        else:
            folders["train"], folders["val"] = stratified_split(
                scan_class_folders(base, "data.root", ignored), val_fraction, seed
            )
    else:
        for split, path in (("train", train_csv), ("val", val_csv), ("test", test_csv)):
            if path is not None:
                grouped: dict[str, list[Path]] = defaultdict(list)
                for file, label in read_csv(Path(path).expanduser(), f"data.{split}_csv"):
                    grouped[label].append(file)
                folders[split] = dict(sorted(grouped.items()))
        if "val" not in folders:
            folders["train"], folders["val"] = stratified_split(folders["train"], val_fraction, seed)
    class_names = sorted(folders["train"])
    for split in ("val", "test"):
        extra = sorted(set(folders.get(split, {})) - set(class_names))
        if extra:
            raise ValueError(f"data: classes {extra} appear in {split} but not in train; train classes are "
                             f"{class_names}")
    if samples_per_class is not None:
        folders["train"] = few_shot(folders["train"], samples_per_class, seed, "data.samples_per_class")
    index = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, list[Sample]] = {}
    for split, by_class in folders.items():
        splits[split] = [(str(f), index[c]) for c, files in by_class.items() for f in files]
    counts = {s: len(v) for s, v in splits.items()}
    rank_zero_info(f"transfer_lit data: {len(class_names)} classes {class_names[:10]}, images {counts}"
                   f"{describe_ignored(ignored)}")
    return class_names, splits
