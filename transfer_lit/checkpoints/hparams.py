"""What the command line's files say before the CLI parses it: a checkpoint's model hyperparameters
(``predict --ckpt_path X`` needs no recipe) and whether its ``--config`` files are valid YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transfer_lit.checkpoints.io import load_torch_file


def with_checkpoint_model(argv: list[str], data_classes: dict[str, str] | None = None,
                          subclass_mode: bool = False) -> list[str]:
    """``argv`` with ``--model <the checkpoint's model hyperparameters>`` right after the subcommand, when
    ``--ckpt_path`` names a checkpoint file, so that whatever the command line sets comes after (and wins).

    Args:
        argv: the command line.
        data_classes: ``{modality: data module class path}``: also ``--data <class>`` for the modality of the
            checkpoint's preprocessing (a text checkpoint predicts with the text data module), unless argv names one.
        subclass_mode: the CLI chooses the model class (``--model {class_path, init_args}``): the checkpoint's own.
    """
    commands = [i for i, arg in enumerate(argv) if arg in ("fit", "validate", "test", "predict")]
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    if path is None and "--ckpt_path" in argv[:-1]:
        path = argv[argv.index("--ckpt_path") + 1]
    if not commands or path is None or not Path(path).is_file():
        return argv
    # mmap: only the hyperparameters are read, not gigabytes of weights; an unreadable file is reported here, at once
    loaded = load_torch_file(path, "--ckpt_path", mmap=True)
    hparams = (loaded.get("hyper_parameters") if isinstance(loaded, dict) else None) or {}
    model: dict[str, Any] = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if not model:
        return argv
    if subclass_mode:  # the class that was trained (saved by a CLI in subclass mode), else transfer_lit's own
        model = {"class_path": hparams.get("_class_path", "transfer_lit.TransferModule"), "init_args": model}
    try:
        encoded = json.dumps(model, ensure_ascii=False)  # escaped, an emoji's surrogate pair is invalid YAML
    except (TypeError, ValueError):  # an object jsonargparse could not read back either
        return argv
    at = commands[0] + 1
    extra = ["--model", encoded]
    state = loaded.get("transfer_lit") if isinstance(loaded, dict) else None
    modality = ((state or {}).get("preprocessing") or {}).get("modality", "image")
    named = any(a == "--data" or a.startswith("--data=") for a in argv)
    if data_classes and modality in data_classes and not named:
        extra += ["--data", data_classes[modality]]
    return [*argv[:at], *extra, *argv[at:]]


def given_hparams() -> bool:
    """True when LightningCLI passes the parsed config as hyperparameters (objects then need no ignoring)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning
        return False
    return _given_hyperparameters.get() is not None


def check_config_files(argv: list[str]) -> None:
    """Raise a ``ValueError`` naming the file, line and column of a ``--config`` file that is not valid YAML
    (jsonargparse's own message names neither the file nor, for some errors, the place)."""
    import yaml

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        file = Path(path).expanduser()
        if not file.is_file():
            continue  # jsonargparse reports a missing file itself
        try:
            yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ValueError(f"--config {path}: not valid YAML{where}: {problem}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"--config {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
