"""Backbones: a headless network plus its blocks and preprocessing metadata."""

from transfer_lit.backbones.base import Backbone, BlockSpec, ModuleBackbone, as_backbone
from transfer_lit.backbones.torchvision import (
    TorchvisionBackbone,
    WeightsNotAvailableError,
    classification_models,
    resolve_weights,
)

__all__ = [
    "Backbone",
    "BlockSpec",
    "ModuleBackbone",
    "TorchvisionBackbone",
    "WeightsNotAvailableError",
    "as_backbone",
    "classification_models",
    "resolve_weights",
]
