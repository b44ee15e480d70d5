"""Image preprocessing: what a vision checkpoint expects (resize, crop, interpolation, mean, std).

:class:`ImagePreprocessing` is read from the weights' own metadata (torchvision's weight enums here,
timm's ``pretrained_cfg`` elsewhere), resolved by :func:`~transfer_lit.preprocessing.resolve_preprocessing`
and turned into torchvision transforms by :func:`build_eval_transform` / :func:`build_train_transform`;
:func:`normalize_images` finishes uint8 batches on the training device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torchvision.transforms import v2
from torchvision.transforms.functional import InterpolationMode

from transfer_lit.preprocessing.base import Preprocessing, register_preprocessing

Interpolation = Literal["nearest", "bilinear", "bicubic"]
Augment = Literal["none", "trivialaugment", "randaugment"]
CropMode = Literal["center", "squash"]
_INTERPOLATIONS: dict[Interpolation, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


@register_preprocessing
@dataclass(frozen=True)
class ImagePreprocessing(Preprocessing):
    """What a checkpoint expects of its input images.

    Args:
        resize_size: the shorter image side is resized to this before the centre crop (eval).
        crop_size: side of the square crop fed to the network.
        interpolation: resampling used for every resize.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after subtracting ``mean``.
        crop_mode: ``center`` (keep the aspect ratio: shorter side to ``resize_size``, then the centre crop) or
            ``squash`` (both sides to ``resize_size``, then the centre crop), as timm's ``crop_mode``.
    """

    modality: ClassVar[str] = "image"

    resize_size: int
    crop_size: int
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_mode: CropMode = "center"

    def __post_init__(self) -> None:
        for key in ("resize_size", "crop_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"preprocessing.{key} must be a positive integer, got {value!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"preprocessing.interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        for key in ("mean", "std"):
            value = getattr(self, key)
            try:  # a scalar or non-numbers (e.g. from YAML) get the same clear error as a wrong length
                numbers = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                numbers = ()
            if len(numbers) != 3:
                raise ValueError(f"preprocessing.{key} must have 3 values (RGB), got {value!r}")
            object.__setattr__(self, key, numbers)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocessing.std must be positive, got {self.std!r}")
        if self.crop_mode not in get_args(CropMode):
            raise ValueError(f"preprocessing.crop_mode must be one of {list(get_args(CropMode))}, got "
                             f"{self.crop_mode!r}")

    def check_inputs(self, inputs: Any) -> None:
        """uint8 images reach the model only when the data module's normalizing hook was bypassed."""
        if isinstance(inputs, torch.Tensor) and inputs.dtype == torch.uint8:
            raise TypeError("TransferModule got uint8 images: ImageDataModule(normalize_on_device=True) normalizes "
                            "them in its transfer_batch_to_device hook, which Lightning calls only when the data "
                            "module is passed as `datamodule=`; pass it that way, call `datamodule.normalize(images)`, "
                            "or set data.normalize_on_device=false")


#: The last level of the precedence rule, for backbones whose weights carry no metadata
#: (a user's own module, random init of an architecture torchvision has no weights for).
#: These are the ImageNet statistics most torchvision and timm checkpoints were trained with.
DEFAULT_PREPROCESSING = ImagePreprocessing(
    resize_size=256,
    crop_size=224,
    interpolation="bilinear",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


def preprocessing_from_torchvision(weights: Any) -> ImagePreprocessing:
    """Read the preprocessing a torchvision ``WeightsEnum`` member declares.

    The metadata lives in torchvision's code (``weights.transforms`` is a partial of
    ``ImageClassification``), so this needs no download.
    """
    transform = weights.transforms()
    for attr in ("resize_size", "crop_size", "mean", "std", "interpolation"):
        if not hasattr(transform, attr):
            raise ValueError(f"weights {weights} do not describe an image-classification transform (no {attr!r})")
    interpolation = {mode: name for name, mode in _INTERPOLATIONS.items()}.get(transform.interpolation)
    if interpolation is None:
        raise ValueError(f"weights {weights} use unsupported interpolation {transform.interpolation}")
    return ImagePreprocessing(
        resize_size=int(transform.resize_size[0]),
        crop_size=int(transform.crop_size[0]),
        interpolation=interpolation,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def _to_tensor(p: ImagePreprocessing, normalize: bool) -> list[Callable[..., Any]]:
    if not normalize:
        return [v2.PILToTensor()]
    return [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(p.mean), std=list(p.std)),
    ]


def normalize_images(x: torch.Tensor, p: ImagePreprocessing) -> torch.Tensor:
    """A uint8 ``(..., 3, H, W)`` batch scaled to [0, 1] and normalized, on its own device.

    The same arithmetic as the transforms' ``ToDtype(scale=True)`` + ``Normalize``.
    """
    mean, std = _channel_stats(p.mean, p.std, x.device)
    return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``(3, 1, 1)`` float32 tensors on ``device``, made once: a copy from Python
    floats to a GPU waits for it, which a per-batch call must not do."""
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).to(device),
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).to(device))


def build_resize(p: ImagePreprocessing) -> v2.Resize:
    """The eval transform's first step: the shorter side to ``resize_size`` (``squash``: both sides)."""
    size: int | tuple[int, int] = p.resize_size if p.crop_mode == "center" else (p.resize_size, p.resize_size)
    return v2.Resize(size, interpolation=_INTERPOLATIONS[p.interpolation], antialias=True)


def build_eval_transform(p: ImagePreprocessing, normalize: bool = True) -> v2.Compose:
    """Resize the shorter side (``squash``: both sides), centre-crop, scale to [0, 1], normalize: torchvision's and
    timm's eval recipe.

    With ``normalize=False`` it stops at a uint8 tensor (``normalize_images`` does the rest later).
    """
    return v2.Compose(
        [
            build_resize(p),
            v2.CenterCrop(p.crop_size),
            *_to_tensor(p, normalize),
        ]
    )


def build_train_transform(p: ImagePreprocessing, augment: Augment = "none", normalize: bool = True) -> v2.Compose:
    """RandomResizedCrop + horizontal flip (+ optional TrivialAugment / RandAugment) at the checkpoint's size.

    Args:
        p: resolved preprocessing; its crop size, interpolation and statistics are reused.
        augment: extra policy applied on the PIL image before tensor conversion.
        normalize: end in a normalized float tensor; ``False`` stops at uint8 (see ``normalize_images``).
    """
    interpolation = _INTERPOLATIONS[p.interpolation]
    steps: list[Callable[..., Any]] = [
        v2.RandomResizedCrop(p.crop_size, interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif augment == "randaugment":
        steps.append(v2.RandAugment(interpolation=interpolation))
    elif augment != "none":
        raise ValueError(f"data.augment must be one of ['none', 'trivialaugment', 'randaugment'], got {augment!r}")
    return v2.Compose(steps + _to_tensor(p, normalize))
