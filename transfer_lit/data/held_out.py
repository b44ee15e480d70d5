"""What ``fit`` held out of the training data (``data.val_fraction`` / ``data.test_fraction``), recorded in its
checkpoint: ``validate`` / ``test`` of that checkpoint on a split held out again of ``data.root`` must get the same
files, else that split may hold images the model was trained on.

The record is the data module's ``state_dict()``, which Lightning saves in every checkpoint; it gives it back with
``load_state_dict`` after the data module's ``setup`` and before the evaluation loop starts, where it is checked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

#: The split each command evaluates (``fit`` resumes training; ``predict`` has no labels to overlap).
EVALUATED = {"validate": "val", "test": "test"}
_SETTINGS = ("seed", "test_fraction", "val_fraction")


def digest(samples: Sequence[tuple[Any, int]], root: str | None = None) -> str:
    """sha256 of a split's sorted inputs: image paths relative to ``root`` (the same from any working directory),
    or texts."""
    keys = sorted(os.path.relpath(str(x), root) if root is not None else str(x) for x, _ in samples)
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def split_record(splits: dict[str, list[tuple[Any, int]]], carved: Sequence[str], seed: int, val_fraction: float,
                 test_fraction: float, root: str | None = None) -> dict[str, Any] | None:
    """``{seed, val_fraction, test_fraction, carved, sha256: {split: digest}}`` of the training split and the splits
    ``carved`` out of it; ``None`` without a training split."""
    if "train" not in splits:
        return None
    return {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction, "carved": sorted(carved),
            "sha256": {s: digest(splits[s], root) for s in ("train", *carved) if s in splits}}


def check_held_out(recorded: dict[str, Any], current: dict[str, Any] | None, command: str | None) -> None:
    """Refuse to evaluate (``command``) a held-out split that is not the one the checkpoint's ``fit`` held out.

    Raises:
        ValueError: naming data.seed / data.test_fraction / data.val_fraction, their recorded and current values.
    """
    split = EVALUATED.get(command or "")
    if split is None or current is None or split not in current["carved"]:
        return  # nothing evaluated, or a split of its own (a test/ folder, data.test_csv): it never overlaps
    if recorded.get("sha256", {}).get(split) == current["sha256"][split]:
        return
    was = ", ".join(f"data.{k}={recorded.get(k)}" for k in _SETTINGS)
    now = ", ".join(f"data.{k}={current[k]}" for k in _SETTINGS)
    if split not in recorded.get("carved", ()):
        why = f"the checkpoint's fit held no {split} split out of its training data ({was})"
    elif all(recorded.get(k) == current[k] for k in _SETTINGS):
        why = (f"the settings are the checkpoint's ({was}) but the files under data.root changed since its fit "
               f"(added, removed or renamed images)")
    else:
        why = f"the checkpoint's fit held it out with {was}, this run with {now}"
    own = "a test/ folder under data.root or data.test_csv" if split == "test" else \
        "a val/ folder under data.root or data.val_csv"
    raise ValueError(f"data: the {split} split held out of data.root is not the one the checkpoint's fit held out: "
                     f"{why}; its images may have been trained on. Use the fit's data.seed, data.test_fraction and "
                     f"data.val_fraction on the same files, or evaluate data of its own ({own})")
