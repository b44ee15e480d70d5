"""What the image data module left out of the files it was given, and the one report of it.

Two kinds: files the ``predict_root`` listing passes over (an extension that is not an image's, a broken symbolic
link) and images ``data.bad_images='skip'`` drops as unreadable while the loaders read them. ``fit`` / ``validate`` /
``test`` warn once at ``teardown``. For ``predict`` the prediction writer takes them (:meth:`SkippedFiles.take`) and
prints one line after its output, the full list in a file beside it; without a writer, ``teardown`` prints the line.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from transfer_lit.data.decode import ImageDataset

#: How many skipped files the one line names (the full list goes to a file).
SHOWN = 5
_ORDER = ("train", "val", "test", "predict")


def describe_skipped(skipped: Mapping[str, str], total: int, full_list: Path | None = None) -> str:
    """One line: how many of ``total`` predict inputs were left out, why, the first few, where the full list is.

    Args:
        skipped: ``{file: why it was left out}``.
        total: inputs given, skipped ones included.
        full_list: the file listing them all, if one was written.
    """
    reasons = "; ".join(f"{why}: {n}" for why, n in sorted(Counter(skipped.values()).items()))
    names = sorted(skipped)
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
    where = f"; the full list is in {full_list}" if full_list is not None else ""
    return f"transfer_lit: predict skipped {len(skipped)} of {total} file(s) ({reasons}): {shown}{where}"


class SkippedFiles:
    """The files left out of the current stage's data: those a listing passed over and the unreadable ones that the
    stage's datasets skipped (flags they share with their loader workers)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the previous stage's datasets and files."""
        self._read: list[tuple[str, ImageDataset]] = []
        self._passed_over: dict[str, str] = {}
        self._taken = False

    def read(self, split: str, dataset: ImageDataset) -> None:
        """``dataset`` is read for ``split``: report what its ``skip`` policy leaves out."""
        self._read.append((split, dataset))

    def pass_over(self, files: Iterable[Path]) -> None:
        """Files of the predict inputs that are no images: not read, but reported."""
        for file in files:
            broken = file.is_symlink() and not file.exists()
            self._passed_over[str(file)] = "broken symbolic link" if broken else \
                f"not an image ({file.suffix.lower() or 'no extension'})"

    def unreadable(self) -> dict[str, list[str]]:
        """``{split: files}`` that ``bad_images='skip'`` left out so far."""
        found: dict[str, set[str]] = defaultdict(set)
        for split, dataset in self._read:
            found[split].update(dataset.skipped_paths())
        return {split: sorted(found[split]) for split in sorted(found, key=_ORDER.index) if found[split]}

    def take(self) -> dict[str, str]:
        """``{file: why}`` of every predict input left out; the caller reports them, ``report`` then does not."""
        self._taken = True
        skipped = dict(self._passed_over)
        skipped.update(dict.fromkeys(self.unreadable().get("predict", []), "unreadable image"))
        return dict(sorted(skipped.items()))

    def report(self, stage: str) -> None:
        """At the end of ``stage``: one warning of the unreadable images left out (``fit``, ``validate``, ``test``),
        or, for ``predict`` when no writer took them, one line of every input left out."""
        if stage == "predict":
            if not self._taken:
                skipped = self.take()
                total = sum(len(d) for split, d in self._read if split == "predict") + len(self._passed_over)
                if skipped:
                    print(describe_skipped(skipped, total), file=sys.stderr)
            return
        unreadable = self.unreadable()
        if unreadable:
            files = sorted({p for paths in unreadable.values() for p in paths})
            per_split = {split: len(paths) for split, paths in unreadable.items()}
            rank_zero_warn(f"transfer_lit data: data.bad_images='skip' left out {len(files)} unreadable image(s) "
                           f"during {stage} {per_split}: {files[:10]}; data.scan=true lists them all before training")
