"""Which image files make up each split: class folders, CSV files, a stratified hold-out, a few-shot subsample."""

from __future__ import annotations

import csv
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from lightning.pytorch.utilities import rank_zero_info

from transfer_lit.data.decode import IMAGE_EXTENSIONS, Sample

_Item = TypeVar("_Item", Path, str)  # an image file, or a text
#: Split folder names, matched case-insensitively (``Train/``, ``valid/``, ``Validation/``, ``dev/`` ...).
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"),
               "test": ("test", "testing")}
#: Folders that hold no data, whatever they contain: hidden ones (``.thumbnails``, ``.ipynb_checkpoints``) and
#: the resource forks macOS adds to zip files.
_JUNK = ("__MACOSX",)


def _hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith(".") or part in _JUNK for part in parts)


def list_images(folder: Path, ignored: list[Path] | None = None) -> list[Path]:
    """Image files under ``folder``, leaving out hidden files and everything in hidden (or ``__MACOSX``) folders;
    other files (``.gif``, ``.txt``, broken symbolic links...) are appended to ``ignored``."""
    files = []
    for p in folder.rglob("*"):
        if _hidden(p.relative_to(folder).parts):
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and ignored is not None:  # a link whose target is gone
            ignored.append(p)
    if ignored is not None:
        ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)


def describe_ignored(ignored: Sequence[Path]) -> str:
    """``"; ignored 1 file(s) whose extension is not in [...]: {'.gif': 1}, e.g. [...]"`` (and broken links) for the
    data log line."""
    broken = sorted(p for p in ignored if p.is_symlink() and not p.exists())
    other = sorted(p for p in ignored if p not in broken)
    text = ""
    if other:
        by_extension = dict(sorted(Counter(p.suffix.lower() or "(none)" for p in other).items()))
        text += (f"; ignored {len(other)} file(s) whose extension is not in {list(IMAGE_EXTENSIONS)}: {by_extension}, "
                 f"e.g. {[str(p) for p in other[:3]]}")
    if broken:
        text += f"; skipped {len(broken)} broken symbolic link(s), e.g. {[str(p) for p in broken[:3]]}"
    return text


def split_folders(base: Path, key: str) -> dict[str, Path]:
    """``{split: folder}`` of ``base``'s sub-folders named like a split (:data:`SPLIT_NAMES`, any case).

    Raises:
        ValueError: when two folders name the same split (``val/`` and ``Validation/``).
    """
    found: dict[str, list[Path]] = defaultdict(list)
    for child in sorted(base.iterdir()):
        for split, names in SPLIT_NAMES.items():
            if child.is_dir() and child.name.lower() in names:
                found[split].append(child)
    for split, dirs in found.items():
        if len(dirs) > 1:
            raise ValueError(f"{key}={str(base)!r} has {len(dirs)} folders for the {split} split: "
                             f"{[d.name for d in dirs]}; keep one (split names: {list(SPLIT_NAMES[split])}, any case)")
    return {split: dirs[0] for split, dirs in found.items()}


def interleaved(by_class: dict[str, list[_Item]]) -> list[tuple[_Item, str]]:
    """One file of each class in turn: the first batches of an evaluation split (the sanity check,
    ``limit_val_batches``) then see every class, not only the first one."""
    ranked = [(i, k, f, c) for k, (c, files) in enumerate(by_class.items()) for i, f in enumerate(files)]
    return [(f, c) for _, _, f, c in sorted(ranked, key=lambda r: (r[0], r[1]))]


def scan_class_folders(root: Path, key: str, ignored: list[Path] | None = None) -> dict[str, list[Path]]:
    """``{class name: image paths}`` of an ImageFolder-style directory, with clear errors.

    Files with other extensions are left out, as ImageFolder does, and appended to ``ignored``.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{key}={str(root)!r}: no such directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden([d.name]))
    if not classes:
        raise ValueError(f"{key}={str(root)!r} has no class sub-folders; expected {root}/<class name>/<image files>")
    skipped: list[Path] = []
    found = {c: list_images(root / c, skipped) for c in classes}
    if ignored is not None:
        ignored += skipped
    empty = [c for c, files in found.items() if not files]
    if empty:
        held = Counter(p.suffix.lower() or "(none)" for p in skipped if p.parent.relative_to(root).parts[0] in empty)
        raise ValueError(
            f"{key}={str(root)!r}: class folder(s) {empty} contain no images with extensions {list(IMAGE_EXTENSIONS)}"
            + (f" (they hold {sum(held.values())} other file(s): {dict(held)})" if held else "")
        )
    return found


def read_csv(path: Path, key: str) -> list[tuple[Path, str]]:
    """Rows ``(path, label)`` of a CSV with a ``path,label`` header; relative paths are resolved against its folder.

    Paths and labels are stripped of surrounding whitespace (``cat `` is ``cat``); an exact duplicate row is kept once.

    Raises:
        ValueError: on an empty label, or a path listed with two different labels.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: the byte-order mark Excel writes
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{key}={str(path)!r} must have a header with columns 'path' and 'label', "
                             f"got {reader.fieldnames}")
        lines = [((row["path"] or "").strip(), (row["label"] or "").strip(), reader.line_num) for row in reader]
    if not lines:
        raise ValueError(f"{key}={str(path)!r} has a header but no rows")
    rows = [(path.parent / file, label) for file, label in _unique_rows(lines, path, key)]
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{key}={str(path)!r} lists {len(missing)} file(s) that do not exist, e.g. {missing[:3]}")
    return rows


def _unique_rows(lines: list[tuple[str, str, int]], path: Path, key: str) -> list[tuple[str, str]]:
    """``(path, label)`` of ``(path, label, line)`` rows, each once; an empty label or a path with two labels is an
    error naming the CSV's lines."""
    split = key.removeprefix("data.").removesuffix("_csv")
    empty = [f"{path}:{line}" for _, label, line in lines if not label]
    if empty:
        raise ValueError(f"data: {len(empty)} {split} row(s) of {key} have an empty or whitespace-only label: "
                         f"{', '.join(empty[:5])}" + (" ..." if len(empty) > 5 else ""))
    seen: dict[str, tuple[str, int]] = {}
    repeated: list[str] = []
    for file, label, line in lines:
        name = os.path.normpath(file)
        if name not in seen:
            seen[name] = (label, line)
        elif seen[name][0] != label:
            raise ValueError(f"{key}={str(path)!r} lists {file!r} with two labels: {seen[name][0]!r} "
                             f"({path}:{seen[name][1]}) and {label!r} ({path}:{line}); give each image one label")
        else:
            repeated.append(f"{path}:{line}")
    if repeated:
        rank_zero_info(f"transfer_lit data: {key}={str(path)!r} repeats {len(repeated)} row(s) (same path and "
                       f"label), each used once: {', '.join(repeated[:3])}" + (" ..." if len(repeated) > 3 else ""))
    return [(file, label) for file, (label, _) in seen.items()]


def stratified_split(by_class: dict[str, list[_Item]], fraction: float, seed: int
                     ) -> tuple[dict[str, list[_Item]], dict[str, list[_Item]]]:
    """Hold out ``fraction`` of every class (at least one image where the class has two or more)."""
    rng = random.Random(seed)
    train, val = {}, {}
    for name, files in by_class.items():
        files = list(files)
        rng.shuffle(files)
        n_val = min(len(files) - 1, max(1, round(fraction * len(files)))) if len(files) > 1 else 0
        val[name], train[name] = sorted(files[:n_val]), sorted(files[n_val:])
    return train, val


def few_shot(by_class: dict[str, list[_Item]], samples_per_class: int, seed: int, key: str) -> dict[str, list[_Item]]:
    """Seeded subsample of ``samples_per_class`` images per class."""
    short = {c: len(f) for c, f in by_class.items() if len(f) < samples_per_class}
    if short:
        raise ValueError(f"{key}={samples_per_class} but these classes have fewer training images: {short}")
    rng = random.Random(seed)
    return {c: sorted(rng.sample(list(files), samples_per_class)) for c, files in by_class.items()}


def carve_held_out(groups: dict[str, dict[str, list[_Item]]], val_fraction: float, test_fraction: float, seed: int
                   ) -> list[str]:
    """Hold out of ``groups["train"]`` (in place) the splits that have no data of their own: a seeded, stratified
    ``test_fraction`` (when > 0), then ``val_fraction``; both are shares of the training data as given, and the
    same files and seed always give the same three splits (``fit`` never sees the test part, ``test`` reads it).
    Returns the names of the splits it held out."""
    if "train" not in groups:
        return []
    carved = []
    share = val_fraction
    if test_fraction > 0:
        if "test" in groups:
            raise ValueError(f"data.test_fraction={test_fraction} holds a test split out of the training data, but the "
                             f"data has a test split of its own (a test/ folder under data.root, or data.test_csv); "
                             f"set data.test_fraction=0, or leave the test data out")
        groups["train"], groups["test"] = stratified_split(groups["train"], test_fraction, seed)
        share, carved = val_fraction / (1 - test_fraction), ["test"]
    if "val" not in groups:
        groups["train"], groups["val"] = stratified_split(groups["train"], share, seed)
        carved.append("val")
    return carved


def number_labels(groups: dict[str, dict[str, list[_Item]]], class_names: list[str], from_model: bool,
                  noun: str = "classes") -> dict[str, list[tuple[_Item, int]]]:
    """Each split's ``(item, class index)`` (an evaluation split's classes interleaved), numbered by ``class_names``:
    the training split's, or (``from_model``) the model's, from its checkpoint: a class it does not know is an error.
    """
    checked = sorted(groups) if from_model else ["val", "test"]  # the training split's classes are the reference
    for split in checked:
        extra = sorted(set(groups.get(split, {})) - set(class_names))
        if extra and from_model:
            raise ValueError(f"data: the {split} split has {noun} {extra} that the model does not know: the classes of "
                             f"its checkpoint (model.class_names) are {class_names}")
        if extra:
            raise ValueError(f"data: {noun} {extra} appear in {split} but not in train; train {noun} are "
                             f"{class_names}")
    index = {name: i for i, name in enumerate(class_names)}
    return {split: [(f, index[c]) for f, c in (interleaved(by_class) if split != "train" else
                                                [(f, c) for c, fs in by_class.items() for f in fs])]
            for split, by_class in groups.items()}


def index_splits(root: str | None, train_csv: str | None, val_csv: str | None, test_csv: str | None,
                 val_fraction: float, samples_per_class: int | None, seed: int, test_fraction: float = 0.0,
                 class_names: list[str] | None = None, carved: list[str] | None = None
                 ) -> tuple[list[str], dict[str, list[Sample]]]:
    """``(class names, {split: [(path, class index)]})`` of ``ImageDataModule``'s arguments of the same names.

    A ``val_csv`` / ``test_csv`` gives its split even with ``root`` (instead of the root's ``val/`` / ``test/``).
    ``class_names`` (the model's) number the labels instead of the training data's, which is then not needed.
    The names of the splits held out of the training data (``val_fraction``, ``test_fraction``) go to ``carved``.
    """
    folders: dict[str, dict[str, list[Path]]] = {}
    ignored: list[Path] = []
    if root is not None:
        base = Path(root).expanduser()
        if base.is_file():
            raise NotADirectoryError(f"data.root={root!r} is a file, not a folder: data.root takes a folder of class "
                                     f"folders (or train/ + val/ ones); a CSV file goes to data.train_csv")
        if not base.is_dir():
            raise FileNotFoundError(f"data.root={root!r}: no such directory")
        found = split_folders(base, "data.root")
        if "train" in found:
            for split, folder in found.items():
                if {"val": val_csv, "test": test_csv}.get(split) is None:  # a CSV given for the split wins
                    folders[split] = scan_class_folders(folder, f"data.root ({folder.name}/)", ignored)
        elif found:
            raise FileNotFoundError(f"data.root={root!r} has val/ or test/ but no train/ folder (found "
                                    f"{sorted(f.name + '/' for f in found.values())}; the training folder may be "
                                    f"named any of {list(SPLIT_NAMES['train'])}, in any case)")
        else:
            folders["train"] = scan_class_folders(base, "data.root", ignored)
    for split, path in (("train", train_csv if root is None else None), ("val", val_csv), ("test", test_csv)):
        if path is not None:
            grouped: dict[str, list[Path]] = defaultdict(list)
            for file, label in read_csv(Path(path).expanduser(), f"data.{split}_csv"):
                grouped[label].append(file)
            folders[split] = dict(sorted(grouped.items()))
    if "train" not in folders and class_names is None:
        raise ValueError("give exactly one of data.root or data.train_csv (without training data, the model's "
                         "class_names number the labels)")
    held_out = carve_held_out(folders, val_fraction, test_fraction, seed)
    if carved is not None:
        carved += held_out
    if samples_per_class is not None and "train" in folders:
        folders["train"] = few_shot(folders["train"], samples_per_class, seed, "data.samples_per_class")
    names = list(class_names) if class_names is not None else sorted(folders["train"])
    numbered = number_labels(folders, names, from_model=class_names is not None)
    splits = {split: [(str(f), label) for f, label in samples] for split, samples in numbered.items()}
    counts = {s: len(v) for s, v in splits.items()}
    for split, samples in splits.items():
        if not samples:
            raise ValueError(f"data: the {split} split has no images (images per split: {counts}); "
                             + ("with data.val_fraction a class needs >= 2 images to lend one to validation: add "
                                "images, or give a val/ folder or data.val_csv" if split == "val" else
                                "add images to it"))
    rank_zero_info(f"transfer_lit data: {len(names)} classes {names[:10]}, images {counts}"
                   f"{describe_ignored(ignored)}")
    return names, splits
