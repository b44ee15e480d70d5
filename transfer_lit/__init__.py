"""transfer_lit: transfer learning with PyTorch Lightning that stays correct on many GPUs."""

from transfer_lit.backbones import Backbone, ModuleBackbone, TorchvisionBackbone, WeightsNotAvailableError
from transfer_lit.callbacks import CSVPredictionWriter, FaultTolerance, ProgressiveUnfreezing
from transfer_lit.checkpoint_io import AtomicCheckpointIO
from transfer_lit.data import ImageDataModule
from transfer_lit.finite_check import NonFiniteLossError
from transfer_lit.heads import LinearHead, MLPHead
from transfer_lit.images import BadImageError, load_image
from transfer_lit.lr_finder import LRFinder
from transfer_lit.module import TransferModule
from transfer_lit.preprocessing import (
    Preprocessing,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    resolve_preprocessing,
)

__all__ = [
    "AtomicCheckpointIO",
    "Backbone",
    "BadImageError",
    "CSVPredictionWriter",
    "FaultTolerance",
    "ImageDataModule",
    "LRFinder",
    "LinearHead",
    "MLPHead",
    "ModuleBackbone",
    "NonFiniteLossError",
    "Preprocessing",
    "ProgressiveUnfreezing",
    "TorchvisionBackbone",
    "TransferModule",
    "WeightsNotAvailableError",
    "build_eval_transform",
    "build_train_transform",
    "load_image",
    "normalize_images",
    "resolve_preprocessing",
]
