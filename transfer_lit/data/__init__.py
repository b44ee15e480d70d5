"""Data modules and what they build on: image decoding, splits, the feature cache."""

from transfer_lit.data.decode import BadImageError, ImageDataset, Sample, load_image, scan_images
from transfer_lit.data.feature_cache import FeatureCache
from transfer_lit.data.images import ImageDataModule
from transfer_lit.data.reader import ImageReader, default_num_workers
from transfer_lit.data.text import TextDataModule

__all__ = [
    "BadImageError",
    "FeatureCache",
    "ImageDataModule",
    "ImageDataset",
    "ImageReader",
    "Sample",
    "TextDataModule",
    "default_num_workers",
    "load_image",
    "scan_images",
]
