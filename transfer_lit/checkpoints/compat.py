"""Does a checkpoint fit the model it is loaded into? One sentence instead of a 40-line key dump.

``load_state_dict`` reports a wrong checkpoint as dozens of missing / unexpected keys and size
mismatches. :func:`check_checkpoint_fits` runs first (from ``TransferModule.on_load_checkpoint``)
and says which part differs, using what the checkpoint recorded about itself: the backbone's
config (LightningCLI saves it in the hyperparameters) and the class names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def describe_config(config: Any, module: Any = None) -> str:
    """``class_path(init_args)`` of a class config as LightningCLI saves it, else the module's class name."""
    if isinstance(config, Mapping) and "class_path" in config:
        args = config.get("init_args") or {}
        return f"{config['class_path']}({', '.join(f'{k}={v!r}' for k, v in dict(args).items())})"
    if isinstance(config, nn.Module):
        module = config
    return type(module).__name__ if module is not None else "unknown (not recorded in the checkpoint)"


def _shape(state: Mapping[str, torch.Tensor], key: str) -> str:
    return str(tuple(state[key].shape)) if key in state else "absent"


def _mismatched(saved: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    keys = {k for k in (*saved, *own) if k.startswith(prefix)}
    return sorted(k for k in keys if k not in saved or k not in own or saved[k].shape != own[k].shape)


def check_checkpoint_fits(checkpoint: Mapping[str, Any], model: nn.Module) -> None:
    """Raise ``ValueError`` if ``checkpoint`` was written for another backbone, head or set of classes.

    Args:
        checkpoint: the loaded Lightning checkpoint (``state_dict``, ``hyper_parameters``, ``transfer_lit``).
        model: the ``TransferModule`` it is about to be loaded into (``backbone``, ``head``, ``num_classes``,
            ``hparams``; ``hparams["class_names"]`` are the names the CLI took from the data, if any).
    """
    saved: Mapping[str, torch.Tensor] = checkpoint.get("state_dict") or {}
    hparams: Mapping[str, Any] = checkpoint.get("hyper_parameters") or {}
    own_hparams: Mapping[str, Any] = getattr(model, "hparams", {})
    own = model.state_dict()
    differ = _mismatched(saved, own, "backbone.")
    if differ:
        total = len({k for k in (*saved, *own) if k.startswith("backbone.")})
        key = differ[0]
        raise ValueError(
            f"the checkpoint holds another backbone: it was trained with model.backbone="
            f"{describe_config(hparams.get('backbone'))}, this run has model.backbone="
            f"{describe_config(own_hparams.get('backbone'), model.backbone)}; {len(differ)} of {total} backbone "
            f"tensors differ (e.g. {key}: {_shape(saved, key)} in the checkpoint, {_shape(own, key)} here). "
            f"Set model.backbone as in the run that wrote it (its config.yaml)"
        )
    num_classes = model.num_classes
    class_names = own_hparams.get("class_names")
    saved_names = list((checkpoint.get("transfer_lit") or {}).get("class_names") or hparams.get("class_names") or [])
    saved_classes = hparams.get("num_classes", len(saved_names) or None)
    if saved_classes is not None and saved_classes != num_classes:
        raise ValueError(
            f"the checkpoint was trained for model.num_classes={saved_classes} (classes {saved_names}) but this run "
            f"has model.num_classes={num_classes} (classes {list(class_names or [])}, from the data); use data with "
            f"the checkpoint's {saved_classes} classes"
        )
    if saved_names and class_names and list(class_names) != saved_names:
        raise ValueError(
            f"the checkpoint's classes {saved_names} differ from this run's model.class_names {list(class_names)} "
            f"(from the data): its label i would be scored as another class; use data with the same class names"
        )
    differ = _mismatched(saved, own, "head.")
    if differ:
        key = differ[0]
        raise ValueError(
            f"the checkpoint's head does not fit: it was trained with model.head={describe_config(hparams.get('head'))}"
            f", this run has model.head={describe_config(own_hparams.get('head'), model.head)} ({key}: "
            f"{_shape(saved, key)} in the checkpoint, {_shape(own, key)} here). Set model.head as in the run that "
            f"wrote it"
        )
