"""The backbone protocol: a headless network that carries its own metadata.

A backbone maps a batch's inputs (a tensor, e.g. images ``(B, 3, H, W)``, or a mapping of tensors,
e.g. a tokenizer's ``input_ids`` and ``attention_mask``) to pooled features ``(B, num_features)`` and
describes itself with an ordered list of named blocks (input -> output) and, when its weights declare
it, the preprocessing those weights expect (any modality's
:class:`~transfer_lit.preprocessing.Preprocessing`). Everything else in transfer_lit (head width,
parameter groups, layer-wise learning rates, progressive unfreezing, BatchNorm policy) reads only this.

To plug in your own network, subclass :class:`Backbone`::

    class MyNet(Backbone):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(16, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.num_features = 32

        def forward(self, x):
            return self.body(self.stem(x))

and select it in YAML with ``class_path: my_package.MyNet``. Blocks default to the top-level
children that hold parameters (here ``stem`` then ``body``); override :meth:`block_specs` for
finer control. The method names (``block_specs``, ``block_params``, ``block_names``,
``block_modules``, ``default_preprocessing``, ``no_weight_decay_names``) leave every ordinary child name
free (timm's ViT has a child called ``blocks``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from transfer_lit.preprocessing import DEFAULT_PREPROCESSING, Preprocessing

BlockSpec = tuple[str, tuple[str, ...]]
"""A block's name and the qualified-name prefixes (relative to the backbone) of what it holds."""

#: A schedule entry ``re:<regex>`` names the block :meth:`Backbone.carve` makes of the parameters matching it.
REGEX_PREFIX = "re:"


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class Backbone(nn.Module):
    """Base class of every backbone.

    Subclasses set ``num_features`` in ``__init__`` and implement ``forward`` returning
    ``(batch, num_features)``. They may set ``preprocessing`` (what their weights expect) and
    override :meth:`block_specs` and :meth:`default_preprocessing`.
    """

    num_features: int
    preprocessing: Preprocessing | None = None

    def block_specs(self) -> list[BlockSpec]:
        """Ordered blocks, input side first. Default: one block per top-level child with parameters.

        Parameters registered directly on the backbone (not inside a child) form a leading ``stem``.
        """
        own = tuple(name for name, _ in self.named_parameters(recurse=False))
        specs: list[BlockSpec] = [("stem", own)] if own else []
        for name, child in self.named_children():
            if any(True for _ in child.parameters()):
                specs.append((name, (name,)))
        return specs

    def default_preprocessing(self) -> Preprocessing:
        """What inputs get when neither the weights nor the user say (default: ImageNet image statistics)."""
        return DEFAULT_PREPROCESSING

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to the backbone; ``fnmatch`` patterns allowed) that get no weight decay,
        besides every norm, bias and 1-D parameter (default: none; timm models declare theirs)."""
        return set()

    def block_params(self) -> OrderedDict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters of each block, input side first; every parameter is in exactly one block.

        Raises:
            ValueError: if a parameter is in no block or in two, naming them.
        """
        specs = self.block_specs()
        result: OrderedDict[str, list[tuple[str, nn.Parameter]]] = OrderedDict((name, []) for name, _ in specs)
        if len(result) != len(specs):
            raise ValueError(f"{type(self).__name__}.block_specs() repeats a block name: {[n for n, _ in specs]}")
        orphans = []
        for pname, param in self.named_parameters():
            owners = [block for block, prefixes in specs if any(_matches(pname, p) for p in prefixes)]
            if len(owners) > 1:
                raise ValueError(
                    f"parameter {pname!r} of {type(self).__name__} is in blocks {owners}; it must be in one"
                )
            if not owners:
                orphans.append(pname)
            else:
                result[owners[0]].append((pname, param))
        if orphans:
            raise ValueError(f"{type(self).__name__}: parameters in no block: {orphans[:5]} ({len(orphans)} in all)")
        empty = [name for name, params in result.items() if not params]
        if empty:
            raise ValueError(f"{type(self).__name__}: blocks with no parameters: {empty}")
        return self._carve_params(result) if getattr(self, "_carved", None) else result

    def carve(self, patterns: Mapping[str, str]) -> None:
        """Give the parameters whose names (relative to the backbone) fully match a regex a block of their own.

        ``{name: regex}``; each carved block comes right after the (output-most) block its parameters came from and
        trains at that block's learning rate. Carving the same patterns again changes nothing.

        Raises:
            ValueError: naming the regex, for one that matches no parameter, a parameter two regexes match, or a
                regex that takes every parameter of a block (name the block instead).
        """
        carved = dict(getattr(self, "_carved", {}))
        carved.update({name: re.compile(regex) for name, regex in patterns.items()})
        self._carved: dict[str, re.Pattern[str]] = carved
        self._carved_after: dict[str, str] = {}
        try:
            spec_blocks = [name for name, _ in self.block_specs()]
            owners = {block: [n for n, _ in params] for block, params in self.block_params().items()}
            for name, rx in carved.items():
                if not owners[name]:
                    names = [n for block in spec_blocks for n in owners[block]]
                    examples = [*names[:2], "...", *names[-2:]]
                    raise ValueError(f"regex {rx.pattern!r} matches no parameter of {type(self).__name__}; parameter "
                                     f"names look like {examples}")
            for block in spec_blocks:
                if not owners[block]:
                    raise ValueError(f"the regexes {sorted(carved)} take every parameter of block {block!r}; name the "
                                     f"block instead")
        except ValueError:
            self._carved = {k: v for k, v in carved.items() if k not in patterns}
            self._carved_after = {}
            raise

    def carved_blocks(self) -> dict[str, str]:
        """Each carved block (:meth:`carve`) and the block its parameters came from (the output-most one)."""
        if getattr(self, "_carved", None) and not self._carved_after:
            self.block_params()
        return dict(getattr(self, "_carved_after", {}))

    def _carve_params(self, blocks: OrderedDict[str, list[tuple[str, nn.Parameter]]]
                      ) -> OrderedDict[str, list[tuple[str, nn.Parameter]]]:
        carved: dict[str, re.Pattern[str]] = self._carved
        taken: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in carved}
        after: dict[str, str] = {}
        kept: OrderedDict[str, list[tuple[str, nn.Parameter]]] = OrderedDict()
        for block, named in blocks.items():
            kept[block] = []
            for pname, param in named:
                matches = [name for name, rx in carved.items() if rx.fullmatch(pname)]
                if len(matches) > 1:
                    raise ValueError(f"parameter {pname!r} of {type(self).__name__} matches the regexes of blocks "
                                     f"{matches}; it must be in one")
                (taken[matches[0]] if matches else kept[block]).append((pname, param))
                if matches:
                    after[matches[0]] = block
        self._carved_after = after
        result: OrderedDict[str, list[tuple[str, nn.Parameter]]] = OrderedDict()
        for block, named in kept.items():
            result[block] = named
            result.update((name, taken[name]) for name in carved if after.get(name) == block)
        result.update((name, []) for name in carved if name not in after)  # matches nothing: carve() says so
        return result

    def block_names(self) -> list[str]:
        """Block names, input side first (the names schedules and parameter groups use)."""
        if getattr(self, "_carved", None):
            return list(self.block_params())
        return [name for name, _ in self.block_specs()]

    def block_modules(self, block: str) -> list[nn.Module]:
        """Every submodule (recursively) that belongs to ``block``; used for BatchNorm policies. A module whose own
        parameters a carved block took (:meth:`carve`) belongs to that block."""
        specs = dict(self.block_specs())
        carved = getattr(self, "_carved", {})
        if block not in specs and block not in carved:
            raise KeyError(f"unknown block {block!r}; valid blocks are {self.block_names()}")

        def owner(name: str, module: nn.Module) -> str | None:
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)] if carved else []
            for block_name, rx in carved.items():  # a module whose own parameters all went to one carved block
                if own and all(rx.fullmatch(p) for p in own):
                    return block_name
            return next((b for b, prefixes in specs.items() if any(_matches(name, p) for p in prefixes)), None)

        return [m for name, m in self.named_modules() if name and owner(name, m) == block]

    def forward(self, x: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ModuleBackbone(Backbone):
    """Adapts any ``nn.Module`` that returns ``(batch, features)`` into a :class:`Backbone`.

    Args:
        module: the network; its top-level children become the blocks.
        num_features: width of its output.
        preprocessing: what its weights expect, if known (else the defaults apply).
    """

    def __init__(self, module: nn.Module, num_features: int, preprocessing: Preprocessing | None = None) -> None:
        super().__init__()
        self.module = module
        self.num_features = num_features
        self.preprocessing = preprocessing

    def block_specs(self) -> list[BlockSpec]:
        own = tuple(f"module.{n}" for n, _ in self.module.named_parameters(recurse=False))
        specs: list[BlockSpec] = [("stem", own)] if own else []
        specs += [(n, (f"module.{n}",)) for n, c in self.module.named_children() if any(True for _ in c.parameters())]
        return specs

    def forward(self, x: Any) -> torch.Tensor:
        return self.module(x)


def as_backbone(module: nn.Module) -> Backbone:
    """Return ``module`` if it already is a :class:`Backbone`, else wrap it (it must have ``num_features``)."""
    if isinstance(module, Backbone):
        return module
    num_features = getattr(module, "num_features", None)
    if not isinstance(num_features, int) or num_features <= 0:
        raise TypeError(
            f"model.backbone: {type(module).__name__} is not a transfer_lit Backbone and has no positive integer "
            f"`num_features` attribute (got {num_features!r}); subclass transfer_lit.Backbone or set num_features"
        )
    return ModuleBackbone(module, num_features, getattr(module, "preprocessing", None))
