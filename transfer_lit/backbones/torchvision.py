"""Any classification model of ``torchvision.models`` as a :class:`~transfer_lit.backbones.Backbone`."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from transfer_lit.backbones.base import Backbone, BlockSpec
from transfer_lit.backbones.weights import WeightsNotAvailableError, is_path, local_file, online, suggest
from transfer_lit.checkpoints.io import load_torch_file
from transfer_lit.preprocessing import ImagePreprocessing, preprocessing_from_torchvision

_HASH_IN_FILENAME = re.compile(r"-([a-f0-9]+)\.")


def classification_models() -> list[str]:
    """Names of every classification architecture torchvision provides."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def resolve_weights(name: str, weights: str | None) -> WeightsEnum | Path | None:
    """Turn the ``weights`` config value into a torchvision enum member, a local file, or ``None``.

    Args:
        name: torchvision architecture name (``resnet50``).
        weights: an enum member name (``IMAGENET1K_V2``), ``DEFAULT``, ``None`` for random init,
            or the path of a local state-dict file.
    """
    models = classification_models()
    if name not in models:
        raise ValueError(
            f"model.backbone.name={name!r} is not a torchvision classification model.{suggest(name, models)} "
            f"Valid names are torchvision.models.list_models(module=torchvision.models), e.g. {models[:6]}"
        )
    if weights is None or weights.lower() in ("none", "null", "random"):
        return None
    if is_path(weights):
        return local_file(weights)
    enum = torchvision.models.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT  # type: ignore[attr-defined]
    valid = [w.name for w in enum]
    if weights not in valid:
        raise ValueError(
            f"model.backbone.weights={weights!r} is not a weight set of {name}.{suggest(weights, valid)} "
            f"Valid values: {[*valid, 'DEFAULT', 'null (random init)', 'a path to a .pth file']}"
        )
    return enum[weights]


def weight_file(weights: WeightsEnum) -> Path:
    """Where torchvision caches the file of ``weights`` (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def verify_hash(path: Path) -> None:
    """Check the SHA-256 prefix that torchvision embeds in its file names (``resnet50-0676ba61.pth``)."""
    match = _HASH_IN_FILENAME.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ValueError(
            f"weight file {path} is corrupt: its sha256 {digest.hexdigest()[:12]}... does not start with "
            f"{match.group(1)!r} (the prefix in its name); delete it and fetch it again"
        )


def ensure_weight_file(weights: WeightsEnum) -> Path:
    """Make sure the file of ``weights`` is in the local cache and intact; never hangs offline."""
    path = weight_file(weights)
    if not path.is_file():
        if not online(weights.url):
            raise WeightsNotAvailableError(
                f"model.backbone.weights={weights}: the file {path.name} is not in the torch hub cache and the "
                f"network is unreachable. Download {weights.url} on a machine with internet and copy it to "
                f"{path} (set TORCH_HOME to use another cache folder)."
            )
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60.0)  # a server that accepts but never answers must not hang the run
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=True)
        finally:
            socket.setdefaulttimeout(previous)
    verify_hash(path)
    return path


def _block_specs(name: str, model: nn.Module) -> list[BlockSpec]:
    """Family-specific block lists; prefixes are relative to the torchvision model."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return [("stem", ("conv1", "bn1"))] + [(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)]
    if name.startswith("vit_"):
        layers = [(n, (f"encoder.layers.{n}",)) for n, _ in model.get_submodule("encoder.layers").named_children()]
        return [("stem", ("conv_proj", "class_token", "encoder.pos_embedding")), *layers, ("norm", ("encoder.ln",))]
    if name.startswith("regnet"):
        trunk = [(n, (f"trunk_output.{n}",)) for n, _ in model.get_submodule("trunk_output").named_children()]
        return [("stem", ("stem",)), *trunk]
    specs: list[BlockSpec] = [("stem", tuple(n for n, _ in model.named_parameters(recurse=False)))]
    for child_name, child in model.named_children():
        if child_name in ("features", "layers") and isinstance(child, nn.Sequential):  # "layers": mnasnet
            specs += [(f"{child_name}.{n}", (f"{child_name}.{n}",)) for n, c in child.named_children()
                      if _has_params(c)]
        elif _has_params(child):
            specs.append((child_name, (child_name,)))
    return [s for s in specs if s[1]]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _strip_classifier(model: nn.Module) -> int:
    """Replace the last ``nn.Linear`` (the ImageNet classifier) by identity; return its input width."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    classifier = getattr(model, "classifier", None)
    conv = classifier[1] if isinstance(classifier, nn.Sequential) and len(classifier) > 1 else None
    if not linears and isinstance(conv, nn.Conv2d):
        # SqueezeNet: dropout, 1x1 conv to the classes, ReLU, global pooling; keep only the pooling.
        model.classifier = nn.AdaptiveAvgPool2d(1)
        return conv.in_channels
    if not linears:
        raise ValueError(f"{type(model).__name__} has no final nn.Linear classifier; use a Backbone subclass instead")
    qualified, last = linears[-1]
    parent_name, _, child = qualified.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return last.in_features


def _load_local_state(model: nn.Module, path: Path) -> None:
    state: Any = load_torch_file(path, "model.backbone.weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"model.backbone.weights={str(path)!r} does not hold a state dict (got {type(state).__name__})"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    head_keys = [k for k in state if k not in expected]
    state = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state]
    bad_shape = [k for k, v in state.items() if v.shape != expected[k].shape]
    if missing or bad_shape:
        raise ValueError(
            f"model.backbone.weights={str(path)!r} does not fit the backbone: missing {missing[:5]}, "
            f"wrong shape {bad_shape[:5]} (ignored classifier keys: {head_keys[:5]})"
        )
    model.load_state_dict(state)


class TorchvisionBackbone(Backbone):
    """A torchvision classification model without its classifier.

    Args:
        name: architecture, any of ``torchvision.models.list_models(module=torchvision.models)``.
        weights: ``DEFAULT``, an enum member name such as ``IMAGENET1K_V2``, ``null`` for random
            init, or the path of a local state-dict file. Enum weights are read from the torch hub
            cache (``$TORCH_HOME/hub/checkpoints``) and checked against their hash prefix.
    """

    def __init__(self, name: str = "resnet18", weights: str | None = "DEFAULT") -> None:
        super().__init__()
        resolved = resolve_weights(name, weights)
        kwargs: dict[str, Any] = {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}
        if isinstance(resolved, WeightsEnum):
            ensure_weight_file(resolved)
            self.model = torchvision.models.get_model(name, weights=resolved, **kwargs)
            self.preprocessing: ImagePreprocessing | None = preprocessing_from_torchvision(resolved)
        else:
            self.model = torchvision.models.get_model(name, weights=None, **kwargs)
            # No checkpoint metadata: the architecture's reference weights tell its native input size.
            default = torchvision.models.get_model_weights(name).DEFAULT  # type: ignore[attr-defined]
            self.preprocessing = preprocessing_from_torchvision(default) if default is not None else None
        self.name = name
        self.weights = weights
        self.num_features = _strip_classifier(self.model)
        if isinstance(resolved, Path):
            _load_local_state(self.model, resolved)

    def block_specs(self) -> list[BlockSpec]:
        specs = _block_specs(self.name, self.model)
        return [(block, tuple(f"model.{p}" for p in prefixes)) for block, prefixes in specs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
