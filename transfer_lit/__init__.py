"""transfer_lit: transfer learning with PyTorch Lightning that stays correct on many GPUs.

``TimmBackbone`` is imported on first use (``transfer_lit.TimmBackbone``): timm is an optional extra.
"""

from transfer_lit.backbones import (
    Backbone,
    HFTextBackbone,
    ModuleBackbone,
    TorchvisionBackbone,
    WeightsNotAvailableError,
)
from transfer_lit.callbacks import CSVPredictionWriter, FaultTolerance, ProgressiveUnfreezing
from transfer_lit.checkpoints import AtomicCheckpointIO
from transfer_lit.data import BadImageError, ImageDataModule, TextDataModule, load_image
from transfer_lit.finite_check import NonFiniteLossError
from transfer_lit.freezing import DDPFreezing, DeepSpeedFreezing, FreezingStrategy, GateOnlyFreezing
from transfer_lit.heads import LinearHead, MLPHead
from transfer_lit.lr_finder import LRFinder
from transfer_lit.module import TransferModule
from transfer_lit.preprocessing import (
    ImagePreprocessing,
    Preprocessing,
    TextPreprocessing,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    resolve_preprocessing,
)
from transfer_lit.protocols import CachedFeatures
from transfer_lit.recipes import fine_tune
from transfer_lit.schedulers import WarmupDecay


def __getattr__(name: str) -> object:
    if name == "TimmBackbone":  # the optional timm extra: imported only when asked for (so not in __all__)
        from transfer_lit.backbones.timm import TimmBackbone

        return TimmBackbone
    raise AttributeError(f"module 'transfer_lit' has no attribute {name!r}")


__all__ = [
    "AtomicCheckpointIO",
    "Backbone",
    "BadImageError",
    "CSVPredictionWriter",
    "CachedFeatures",
    "DDPFreezing",
    "DeepSpeedFreezing",
    "FaultTolerance",
    "FreezingStrategy",
    "GateOnlyFreezing",
    "HFTextBackbone",
    "ImageDataModule",
    "ImagePreprocessing",
    "LRFinder",
    "LinearHead",
    "MLPHead",
    "ModuleBackbone",
    "NonFiniteLossError",
    "Preprocessing",
    "ProgressiveUnfreezing",
    "TextDataModule",
    "TextPreprocessing",
    "TorchvisionBackbone",
    "TransferModule",
    "WarmupDecay",
    "WeightsNotAvailableError",
    "build_eval_transform",
    "build_train_transform",
    "fine_tune",
    "load_image",
    "normalize_images",
    "resolve_preprocessing",
]
