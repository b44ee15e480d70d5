"""Checks and rewrites of the parsed ``transfer-lit`` configuration that need more than a link."""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any
from unittest import mock


def show_the_head_lr(model: Any) -> None:
    """Every parameter group gets its own learning rate (``model.lr``, ``backbone_lr_mult``, ``layer_decay``), so
    the optimizer's own ``lr`` is never used: show ``model.lr`` there (in ``--print_config``, ``config.yaml`` and
    the checkpoint's hyperparameters), and refuse a value set on purpose, which would silently do nothing."""
    optimizer = model.get("optimizer")
    init_args = getattr(optimizer, "init_args", None)
    if init_args is None or "lr" not in init_args or "lr" not in model:
        return
    try:
        module, _, name = optimizer.class_path.rpartition(".")
        default = inspect.signature(getattr(importlib.import_module(module), name)).parameters["lr"].default
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return
    if init_args["lr"] not in (default, model["lr"]):
        raise ValueError(f"model.optimizer.init_args.lr={init_args['lr']} is not used: every parameter group gets "
                         f"its own learning rate; set model.lr (the head's, now {model['lr']}), "
                         f"model.backbone_lr_mult and model.layer_decay instead")
    init_args["lr"] = model["lr"]


def parse_as_run(parser: Any, argv: list[str]) -> Any:
    """``parser.parse_args(argv)``, with ``--print_config`` printing the configuration as it will run: the optimizer's
    ``lr`` is the head's (:func:`show_the_head_lr`), not the optimizer class's default. jsonargparse prints from
    ``_ActionPrintConfig.print_config_if_requested`` part-way through parsing (an incomplete recipe still prints);
    the model section is rewritten just before it."""
    from jsonargparse._actions import _ActionPrintConfig

    print_config = _ActionPrintConfig.print_config_if_requested

    def print_as_run(printing_parser: Any, config: Any) -> None:
        if hasattr(printing_parser, "print_config"):
            with contextlib.suppress(AttributeError, KeyError, TypeError):
                section = config[config["subcommand"]] if config.get("subcommand") else config
                model = section["model"]
                show_the_head_lr(model["init_args"] if model.get("class_path") else model)
        print_config(printing_parser, config)

    with mock.patch.object(_ActionPrintConfig, "print_config_if_requested", staticmethod(print_as_run)):
        return parser.parse_args(argv)
