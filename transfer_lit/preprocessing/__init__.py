"""Per-modality preprocessing (what a checkpoint expects of its inputs) and the one rule that resolves it."""

from transfer_lit.preprocessing.base import Preprocessing, register_preprocessing, resolve_preprocessing
from transfer_lit.preprocessing.images import (
    DEFAULT_PREPROCESSING,
    Augment,
    ImagePreprocessing,
    Interpolation,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    preprocessing_from_torchvision,
)
from transfer_lit.preprocessing.text import TextPreprocessing

__all__ = [
    "DEFAULT_PREPROCESSING",
    "Augment",
    "ImagePreprocessing",
    "Interpolation",
    "Preprocessing",
    "TextPreprocessing",
    "build_eval_transform",
    "build_train_transform",
    "normalize_images",
    "preprocessing_from_torchvision",
    "register_preprocessing",
    "resolve_preprocessing",
]
