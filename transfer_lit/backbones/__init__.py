"""Backbones: a headless network plus its blocks and preprocessing metadata (``TimmBackbone``: on first use)."""

from transfer_lit.backbones.base import Backbone, BlockSpec, ModuleBackbone, as_backbone
from transfer_lit.backbones.hf_text import HFTextBackbone
from transfer_lit.backbones.torchvision import (
    TorchvisionBackbone,
    WeightsNotAvailableError,
    classification_models,
    resolve_weights,
)


def __getattr__(name: str) -> object:
    if name == "TimmBackbone":  # the optional timm extra: imported only when asked for (so not in __all__)
        from transfer_lit.backbones.timm import TimmBackbone

        return TimmBackbone
    raise AttributeError(f"module 'transfer_lit.backbones' has no attribute {name!r}")


__all__ = [
    "Backbone",
    "BlockSpec",
    "HFTextBackbone",
    "ModuleBackbone",
    "TorchvisionBackbone",
    "WeightsNotAvailableError",
    "as_backbone",
    "classification_models",
    "resolve_weights",
]
