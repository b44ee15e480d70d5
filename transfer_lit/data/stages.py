"""What each command reads of the data: ``fit`` the training data and its held-out splits, ``validate`` / ``test`` /
``predict`` only the split they evaluate, whose labels the model's classes (its checkpoint's) then number.

``test --ckpt_path X --data.test_csv t.csv`` needs no training data, and neither does ``predict --config recipe.yaml
--ckpt_path X`` when the recipe's training folder is gone: :func:`evaluated_data` leaves out of the data module's
arguments what the command does not read, once the model's classes are known.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from transfer_lit.data.base import LabelledDataModule
from transfer_lit.protocols import Classifier

#: ``{command: (the data arguments that give what it reads, those it then does not need)}``.
_READS = {
    "validate": (("val_csv",), ("root", "train_csv", "test_csv")),
    "test": (("test_csv",), ("root", "train_csv", "val_csv")),
    "predict": (("predict_root", "predict_csv"), ("root", "train_csv", "val_csv", "test_csv")),
}


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` naming ``data.val_fraction`` / ``data.test_fraction`` unless they split the data."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"data.test_fraction must be in [0, 1) and leave training data: data.val_fraction + "
                         f"data.test_fraction < 1, got {test_fraction} (data.val_fraction={val_fraction})")


def model_class_names(data: Any) -> list[str]:
    """The classes of the model ``data``'s trainer runs (restored from its checkpoint), which number the labels of
    data given without a training split."""
    module = data.trainer.lightning_module if data.trainer is not None else None
    if not isinstance(module, Classifier) or not module.class_names:
        raise ValueError("data without a training split (no data.root, no data.train_csv) needs a model that knows "
                         "its classes: give --ckpt_path (or model.class_names)")
    return list(module.class_names)


def _labelled_data_module(class_path: Any) -> bool:
    if isinstance(class_path, type):
        return issubclass(class_path, LabelledDataModule)
    module, _, name = str(class_path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module or "transfer_lit"), name, None)
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, LabelledDataModule)


def evaluated_data(data: Any, command: str | None, model_classes: Any, data_class: Any = None
                   ) -> list[str]:
    """Set to ``None``, in the parsed ``data`` config of a transfer_lit data module, the inputs that ``command``
    (``validate``, ``test``, ``predict``) does not read when the model's classes are known (a checkpoint's) and the
    command has data of its own (``data.test_csv`` for ``test``): nothing else needs the training data then.

    Args:
        data: the parsed ``data`` config (``class_path`` + ``init_args``, or the arguments themselves).
        command: the subcommand (``None``: nothing to do).
        model_classes: the model's ``class_names`` (or ``num_classes``) as configured (from ``--ckpt_path``'s
            hyperparameters), if any.
        data_class: the data module class when the config names none (LightningCLI without subclass mode).

    Returns:
        The keys set to ``None`` (``["root"]``), also printed to stderr.

    Raises:
        ValueError: when neither the data (no training split) nor the model knows the classes.
    """
    if command is None or data is None or not hasattr(data, "get"):
        return []
    init_args = data.get("init_args") if data.get("class_path") else data
    if init_args is None or not _labelled_data_module(data.get("class_path") or data_class):
        return []
    evaluated_only = not any(init_args.get(key) for key in ("root", "train_csv")) and any(
        init_args.get(key) for key in ("val_csv", "test_csv", "predict_root", "predict_csv"))
    if not model_classes:
        if evaluated_only:
            raise ValueError(f"{command}: the data has no training split to take the classes from (data.root, "
                             f"data.train_csv) and the model names none: give the checkpoint to evaluate "
                             f"(--ckpt_path), or data.root / data.train_csv")
        return []
    reads, unread = _READS.get(command, ((), ()))
    if not any(init_args.get(key) for key in reads):
        return []  # the split comes from data.root (its folder, or held out of the training data): keep it all
    dropped = [key for key in unread if init_args.get(key) is not None]
    for key in dropped:
        init_args[key] = None
    if dropped:
        print(f"transfer-lit: {command} reads only its own data, with the model's classes: "
              f"{', '.join('data.' + key for key in dropped)} left out", file=sys.stderr)
    return dropped
