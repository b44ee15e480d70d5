"""The logger from the command line: ``--trainer.logger TensorBoardLogger`` (or ``CSVLogger``) as it comes.

Lightning's ``TensorBoardLogger`` and ``CSVLogger`` require ``save_dir``, which Lightning's default logger takes from
``trainer.default_root_dir``; here the named logger does the same unless ``--trainer.logger.save_dir`` is given,
so ``--trainer.logger TensorBoardLogger`` writes where the default logger would. A TensorBoard logger without
``tensorboard`` installed is refused before anything is built, in one line that names the extra to install.

Where each command logs (``<name>/version_N/``: ``metrics.csv``, ``hparams.yaml``, ``config.yaml``) without a
``trainer.default_root_dir``: ``fit`` under the working directory (a resumed fit continues its checkpoint's version
folder: :mod:`transfer_lit.checkpoints.resume`); ``validate`` / ``test`` beside the version folder that trained the
checkpoint they evaluate (:func:`run_folder`); ``predict`` nowhere (the CLI keeps no logger or ``config.yaml`` for it:
it logs no metrics, and its checkpoint holds the hyperparameters).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch.loggers

#: ``save_dir`` of a logger named on the command line without one, until ``trainer.default_root_dir`` is known
#: (also accepted in a config file: ``save_dir: <trainer.default_root_dir>``).
DEFAULT_ROOT_DIR = "<trainer.default_root_dir>"
_CLASS_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _logger_class(name: str) -> type | None:
    """The class ``--trainer.logger name`` means (``TensorBoardLogger`` or a dotted path), else ``None``."""
    if not _CLASS_NAME.fullmatch(name):
        return None
    module, _, attribute = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module) if module else lightning.pytorch.loggers, attribute, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def _needs_save_dir(name: str) -> bool:
    cls = _logger_class(name)
    try:
        parameter = inspect.signature(cls).parameters.get("save_dir") if cls is not None else None
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def with_logger_save_dir(argv: list[str]) -> list[str]:
    """``argv`` with ``--trainer.logger.save_dir <trainer.default_root_dir>`` right after a ``--trainer.logger CLASS``
    whose class requires ``save_dir``; a ``--trainer.logger.save_dir`` given after it still wins."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg.startswith("--trainer.logger="):
            name = arg.partition("=")[2]
        elif i > 0 and argv[i - 1] == "--trainer.logger":
            name = arg
        else:
            continue
        if _needs_save_dir(name):
            out += ["--trainer.logger.save_dir", DEFAULT_ROOT_DIR]
    return out


def _loggers(value: Any) -> list[Any]:
    """The class specs (``class_path`` + ``init_args``) in a parsed ``trainer.logger``: one, a list, or none."""
    specs = value if isinstance(value, list | tuple) else [value]
    return [spec for spec in specs if hasattr(spec, "get") and spec.get("class_path")]


def run_folder(ckpt_path: Any) -> str | None:
    """The folder of the run that wrote ``ckpt_path``: ``<save_dir>`` of ``<save_dir>/<name>/<version>/checkpoints/
    x.ckpt``; ``None`` for ``last`` (found in the working directory's run already), no file, a checkpoint outside
    such a folder, or a run folder this process cannot write to."""
    path = Path(str(ckpt_path)).expanduser()
    if not ckpt_path or not path.is_file() or path.parent.name != "checkpoints":
        return None
    root = path.resolve().parents[3]
    return str(root) if os.access(root, os.W_OK) else None


def resolve_loggers(trainer: Any, command: str | None = None, ckpt_path: Any = None) -> None:
    """In the parsed trainer config: for ``validate`` / ``test`` without ``trainer.default_root_dir``, make it the
    :func:`run_folder` of ``ckpt_path`` (if any); put ``trainer.default_root_dir`` (the working directory without
    one) in place of :data:`DEFAULT_ROOT_DIR`; refuse a TensorBoard logger when neither ``tensorboard`` nor
    ``tensorboardX`` (what Lightning's ``TensorBoardLogger`` accepts) can be imported."""
    if command in ("validate", "test") and not trainer.get("default_root_dir"):
        trainer["default_root_dir"] = run_folder(ckpt_path)
    for spec in _loggers(trainer.get("logger")):
        init_args = spec.get("init_args")
        if init_args is not None and init_args.get("save_dir") == DEFAULT_ROOT_DIR:
            init_args["save_dir"] = os.fspath(trainer.get("default_root_dir") or os.getcwd())
        cls = _logger_class(spec["class_path"])
        if cls is not None and issubclass(cls, lightning.pytorch.loggers.TensorBoardLogger) \
                and not any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX")):
            raise ValueError(f"trainer.logger={spec['class_path']} needs the tensorboard package, which is not "
                             f"installed: pip install 'transfer-lit[tensorboard]' (or choose "
                             f"--trainer.logger CSVLogger)")
