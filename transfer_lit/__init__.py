"""transfer_lit: transfer learning with PyTorch Lightning that stays correct on many GPUs."""

from transfer_lit.backbones import Backbone, ModuleBackbone, TorchvisionBackbone, WeightsNotAvailableError
from transfer_lit.callbacks import CSVPredictionWriter
from transfer_lit.data import ImageDataModule
from transfer_lit.heads import LinearHead, MLPHead
from transfer_lit.images import BadImageError, load_image
from transfer_lit.module import NonFiniteLossError, TransferModule
from transfer_lit.preprocessing import Preprocessing, build_eval_transform, build_train_transform, resolve_preprocessing

__all__ = [
    "Backbone",
    "BadImageError",
    "CSVPredictionWriter",
    "ImageDataModule",
    "LinearHead",
    "MLPHead",
    "ModuleBackbone",
    "NonFiniteLossError",
    "Preprocessing",
    "TorchvisionBackbone",
    "TransferModule",
    "WeightsNotAvailableError",
    "build_eval_transform",
    "build_train_transform",
    "load_image",
    "resolve_preprocessing",
]
