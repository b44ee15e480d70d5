"""Checks and rewrites of the parsed ``transfer-lit`` configuration that need more than a link."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
from typing import Any, NoReturn
from unittest import mock

from jsonargparse._common import debug_mode_active
from lightning.pytorch.cli import LightningArgumentParser


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


_KEY = re.compile(r'^(?:- )?(?:Problem with given class_path [^:]*:\s*)?Parser key "([^"]+)":\s*(.*)$')
_UNKNOWN = re.compile(r"Option '([^']+)' is not accepted")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$")


def plain_parse_error(message: str) -> str:
    """jsonargparse's nested report on a bad value in one line: the full key, what was given and what is valid.

    ``Parser key "model": Does not validate against any of the Union subtypes ... Parser key "mode": Expected a
    typing.Literal['linear_probe', 'finetune', 'progressive']. Got value: finetuned`` becomes ``model.mode: got
    'finetuned'; valid: 'linear_probe', 'finetune', 'progressive'``. Messages of another shape are kept."""
    path: list[tuple[int, str]] = []
    found: tuple[int, str] | None = None
    for line in message.splitlines():
        indent, text = len(line) - len(line.lstrip()), line.strip()
        while path and path[-1][0] >= indent:
            path.pop()
        key = _KEY.match(text)
        if key is not None:
            path.append((indent, key.group(1)))
            text = key.group(2)
        option = _UNKNOWN.search(text)
        if option is not None:
            text, path = "no such option", [*path, (indent, option.group(1))]
        if ("Expected a" in text and "NoneType" not in text) or "Got value" in text or option is not None:
            literal = _LITERAL.search(text)
            detail = f"got {literal.group(2)!r}; valid: {literal.group(1)}" if literal else text.lstrip("- ")
            if found is None or len(path) > found[0]:
                found = (len(path), ".".join(k for _, k in path) + ": " + detail)
    return found[1] if found is not None and found[0] > 0 else message


class TransferArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, with a bad value reported in one line (:func:`plain_parse_error`) instead of the usage
    synopsis and jsonargparse's nested report (``JSONARGPARSE_DEBUG=true`` in the environment shows that)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        prog = " ".join(["transfer-lit", *self.prog.replace(" [options]", "").split()[1:]])  # not __main__.py
        sys.stderr.write(f"{prog}: error: {plain_parse_error(message)}\n(`{prog} --help` lists the options)\n")
        self.exit(2)
