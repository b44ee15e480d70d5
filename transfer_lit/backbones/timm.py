"""Any timm model as a :class:`~transfer_lit.backbones.Backbone`, its ``pretrained_cfg`` as the preprocessing.

``timm`` is an optional extra (``pip install 'transfer-lit[timm]'``); the rest of transfer_lit never
imports it. What timm declares about a model is used as it is, not guessed from names:

* preprocessing: ``timm.data.resolve_data_config`` (input size, interpolation, ``crop_pct``, ``crop_mode``,
  mean, std), so the eval transform equals ``timm.data.create_transform(**config)``;
* blocks: the model's own ``group_matcher()`` (``coarse``: stem, each stage or transformer block, final
  norm; ``fine``: what timm's layer-wise LR decay uses), every parameter in exactly one block;
* weight decay: none for the model's ``no_weight_decay()`` parameters, besides norms and biases.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn

from transfer_lit.backbones.base import Backbone, BlockSpec
from transfer_lit.backbones.weights import WeightsNotAvailableError, is_path, local_file, online, suggest
from transfer_lit.preprocessing import ImagePreprocessing

Groups = Literal["coarse", "fine"]
_HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def import_timm() -> ModuleType:
    """``timm``, or an ``ImportError`` that says how to install it."""
    try:
        import timm
    except ImportError as error:  # pragma: no cover - exercised without the extra
        raise ImportError("TimmBackbone needs timm: pip install 'transfer-lit[timm]'") from error
    return timm


def preprocessing_from_timm(config: dict[str, Any], name: str = "the model") -> ImagePreprocessing:
    """:class:`ImagePreprocessing` of a timm data config (``timm.data.resolve_data_config``).

    Raises:
        ValueError: for what the image pipeline cannot reproduce exactly (non-square input, ``crop_mode``
            ``border``, an interpolation other than nearest / bilinear / bicubic), naming the value.
    """
    _, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"{name}: timm's input_size {tuple(config['input_size'])} is not square; transfer_lit crops "
                         f"squares (set model.preprocessing.crop_size to override)")
    mode = config.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise ValueError(f"{name}: timm's crop_mode {mode!r} is not supported (valid: 'center', 'squash'); set "
                         f"model.preprocessing.crop_mode to override")
    interpolation = config.get("interpolation") or "bilinear"
    if interpolation not in ("nearest", "bilinear", "bicubic"):
        raise ValueError(f"{name}: timm's interpolation {interpolation!r} is not supported (valid: 'nearest', "
                         f"'bilinear', 'bicubic'); set model.preprocessing.interpolation to override")
    crop_pct = config.get("crop_pct") or 0.875
    return ImagePreprocessing.from_dict({  # type: ignore[return-value]
        "resize_size": math.floor(height / crop_pct), "crop_size": int(height), "interpolation": interpolation,
        "mean": tuple(config["mean"]), "std": tuple(config["std"]), "crop_mode": mode})


def _hub_source(cfg: dict[str, Any]) -> tuple[str, Path | None]:
    """Where timm would read the pretrained file of ``cfg`` from: a description, and the file if it is cached."""
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in _HF_FILES:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return f"{repo}/{filename}", Path(found)
        return f"{repo}/model.safetensors in the Hugging Face cache ({constants.HF_HUB_CACHE})", None
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        return f"{url} (cached as {path})", path if path.is_file() else None
    return "nowhere (its pretrained_cfg names no hub id, URL or file)", None


def _check_name(timm: ModuleType, name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):  # timm resolves these itself
        return
    arch, tag = timm.models.split_model_name_tag(name)
    models = timm.list_models()
    deprecated = getattr(timm.models._registry, "_deprecated_models", {})
    if arch not in models and name not in deprecated and arch not in deprecated:
        raise ValueError(f"model.backbone.name={name!r} is not a timm model.{suggest(arch, models)} Valid names are "
                         f"timm.list_models(), e.g. {models[:4]}")
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise ValueError(f"model.backbone.name={name!r}: {arch} has no pretrained tag {tag!r}.{suggest(tag, tags)} "
                             f"Valid tags: {tags}")


def create_timm_model(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, num_classes=0, ...)`` with ``weights``: ``None`` (random init), ``pretrained``
    (timm's file for the tag, from the hub cache or downloaded; offline and not cached: an immediate
    :class:`WeightsNotAvailableError`), or a local file (``pretrained_cfg_overlay=dict(file=...)``)."""
    timm = import_timm()
    _check_name(timm, name)
    kwargs = {**kwargs, "num_classes": 0}
    if weights is None or weights.lower() in ("none", "null", "random"):
        return timm.create_model(name, pretrained=False, **kwargs)
    if is_path(weights):
        return _from_file(timm, name, local_file(weights), kwargs)
    if weights != "pretrained":
        raise ValueError(f"model.backbone.weights={weights!r}: valid values for a timm backbone are 'pretrained', "
                         f"null (random init) or the path of a weight file (.safetensors, .pth, .bin)")
    cfg = timm.create_model(name, pretrained=False, **kwargs).pretrained_cfg
    where, cached = _hub_source(dict(cfg))
    if cached is not None:
        return _from_file(timm, name, cached, kwargs)
    url = f"https://huggingface.co/{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else str(cfg.get("url") or "")
    if not url or not online(url):
        raise WeightsNotAvailableError(
            f"model.backbone.weights=pretrained: timm's weights for {name} are not cached and the network is "
            f"unreachable; timm reads them from {where}. Download them on a machine with internet and copy the file "
            f"here, then pass its path as model.backbone.init_args.weights (or copy the cache folder)")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60.0)  # a server that accepts but never answers must not hang the run
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    finally:
        socket.setdefaulttimeout(previous)


class _KeyMismatch(logging.Handler):
    """Collects timm's 'Missing keys' / 'Unexpected keys' messages: with ``num_classes=0`` timm loads non-strictly
    and only logs them, so a file of another model would load half-way without a word."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Missing keys", "Unexpected keys")):
            self.messages.append(message)


def _from_file(timm: ModuleType, name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    logger = logging.getLogger("timm")
    mismatch, level = _KeyMismatch(), logger.level
    logger.addHandler(mismatch)
    logger.setLevel(logging.INFO)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as error:  # a damaged file, wrong shapes
        raise ValueError(f"model.backbone.weights={str(path)!r} could not be loaded into {name}: "
                         f"{str(error).splitlines()[0][:300]}") from error
    finally:
        logger.removeHandler(mismatch)
        logger.setLevel(level)
    if mismatch.messages:
        raise ValueError(f"model.backbone.weights={str(path)!r} could not be loaded into {name}: it holds another "
                         f"model's weights ({mismatch.messages[0][:300]})")
    return model


def block_specs_from_groups(model: nn.Module, groups: dict[int, list[str]]) -> list[BlockSpec]:
    """Blocks of ``groups`` (timm's ``group_parameters``: ordinal -> parameter names, input side first).

    Each block's prefixes are the largest submodules whose parameters all belong to it (so BatchNorm policies
    find its modules), plus its parameters that sit directly on a module shared with other blocks; they are
    listed in the model's own order.
    """
    owner = {p: gid for gid, names in groups.items() for p in names}
    single: dict[str, int] = {}
    for module_name, module in model.named_modules():
        ids = {owner[f"{module_name}.{n}" if module_name else n] for n, _ in module.named_parameters()}
        if len(ids) == 1 and module_name:
            single[module_name] = ids.pop()
    prefixes: dict[int, dict[str, None]] = defaultdict(dict)  # insertion-ordered: the model's order
    for param, _ in model.named_parameters():
        gid, parts, best = owner[param], param.split("."), param
        for depth in range(len(parts) - 1, 0, -1):
            candidate = ".".join(parts[:depth])
            if single.get(candidate) != gid:
                break
            best = candidate
        prefixes[gid][best] = None
    specs: list[BlockSpec] = []
    used: set[str] = set()
    for index, gid in enumerate(sorted(groups)):
        name = _block_name(list(prefixes[gid]), index)
        while name in used:
            name += "_"
        used.add(name)
        specs.append((name, tuple(prefixes[gid])))
    return specs


def _block_name(prefixes: list[str], index: int) -> str:
    """A block's one prefix (``blocks.3``); ``stem`` for a first block of several; else its prefixes in model order
    joined by ``+`` (timm merges ViT's final norm into the last block: ``blocks.11+norm``)."""
    if len(prefixes) == 1:
        return prefixes[0]
    return "stem" if index == 0 else "+".join(prefixes)


class TimmBackbone(Backbone):
    """A timm model without its classifier (``num_classes=0``), as timm describes it.

    Args:
        name: any ``timm.list_models()`` architecture, optionally with a pretrained tag
            (``vit_small_patch16_224.augreg_in21k_ft_in1k``); the tag's ``pretrained_cfg`` sets the
            preprocessing even with random init.
        weights: ``pretrained`` (timm's file for the tag, from the Hugging Face / torch hub cache; offline and
            not cached it fails at once, naming the file), ``null`` for random init, or the path of a local
            weight file (a timm state dict, ``.safetensors`` or ``.pth``; classifier keys are ignored).
        groups: blocks for unfreezing and layer-wise LR decay from the model's ``group_matcher``: ``coarse``
            (stages / transformer blocks) or ``fine`` (timm's layer-decay groups, e.g. every ResNet bottleneck).
        model_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, ``img_size``, ...).
    """

    def __init__(self, name: str = "resnet18", weights: str | None = "pretrained", groups: Groups = "coarse",
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if groups not in ("coarse", "fine"):
            raise ValueError(f"model.backbone.groups must be 'coarse' or 'fine', got {groups!r}")
        self.model: Any = create_timm_model(name, weights, dict(model_kwargs or {}))
        self.name, self.weights, self.groups = name, weights, groups
        # MobileNetV3 / GhostNet pool then widen (conv_head): their pooled output is head_hidden_size wide.
        width: Any = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        self.num_features = int(width)
        # An img_size given to create_model changes the model but not its pretrained_cfg: the input size follows it.
        size = (model_kwargs or {}).get("img_size")
        args = {"input_size": (3, *((size, size) if isinstance(size, int) else size))} if size else {}
        config = import_timm().data.resolve_data_config(args, model=self.model)
        self.preprocessing: ImagePreprocessing | None = preprocessing_from_timm(config, name)
        # Read once (block_names / block_modules ask for them every epoch); a model whose groups cannot be read
        # fails here, not when the optimizer is built.
        self._specs = self._group_specs()
        self.block_params()

    def block_specs(self) -> list[BlockSpec]:
        return list(self._specs)

    def _group_specs(self) -> list[BlockSpec]:
        if not callable(getattr(self.model, "group_matcher", None)):  # PiT, MetaFormer: the top-level children
            children = [(n, (f"model.{n}",)) for n, c in self.model.named_children()
                        if any(True for _ in c.parameters())]
            own = tuple(f"model.{n}" for n, _ in self.model.named_parameters(recurse=False))
            return [("stem", own)] * bool(own) + children
        timm = import_timm()
        matcher = self.model.group_matcher(coarse=self.groups == "coarse")
        groups = timm.models.group_parameters(self.model, matcher)
        specs = block_specs_from_groups(self.model, dict(groups))
        return [(block, tuple(f"model.{p}" for p in prefixes)) for block, prefixes in specs]

    def no_weight_decay_names(self) -> set[str]:
        declared = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in declared()} if callable(declared) else set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
