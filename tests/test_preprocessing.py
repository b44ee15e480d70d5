"""Checkpoint-matched preprocessing: torchvision parity on real images, train transform, precedence rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import HYMENOPTERA, needs_hymenoptera
from PIL import Image
from torchvision import models
from torchvision.transforms import v2

from transfer_lit import (
    ImagePreprocessing,
    Preprocessing,
    build_eval_transform,
    build_train_transform,
    load_image,
    resolve_preprocessing,
)
from transfer_lit.preprocessing import DEFAULT_PREPROCESSING, preprocessing_from_torchvision

WEIGHTS = {
    "resnet50_v1": models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet50_v2": models.ResNet50_Weights.IMAGENET1K_V2,
    "vit_b_16": models.ViT_B_16_Weights.IMAGENET1K_V1,
    "vit_b_16_swag_bicubic_384": models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1,
    "swin_t_bicubic": models.Swin_T_Weights.IMAGENET1K_V1,
    "efficientnet_v2_s_384": models.EfficientNet_V2_S_Weights.IMAGENET1K_V1,
}
EXPECTED = {  # (resize, crop, interpolation) as torchvision documents them
    "resnet50_v1": (256, 224, "bilinear"),
    "resnet50_v2": (232, 224, "bilinear"),
    "vit_b_16": (256, 224, "bilinear"),
    "vit_b_16_swag_bicubic_384": (384, 384, "bicubic"),
    "swin_t_bicubic": (232, 224, "bicubic"),
    "efficientnet_v2_s_384": (384, 384, "bilinear"),
}
CKPT = ImagePreprocessing(232, 224, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _generated_image(width: int = 410, height: int = 300) -> Image.Image:
    """Non-square, with detail at every scale (noise on gradients) so resampling differences would show."""
    gen = torch.Generator().manual_seed(0)
    across = torch.linspace(0, 200, width).expand(height, width)
    down = torch.linspace(0, 200, height)[:, None].expand(height, width)
    noise = torch.randint(0, 56, (3, height, width), generator=gen)
    pixels = (torch.stack([across, across.flip(1), down]) + noise).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


def _real_images() -> list[Path]:
    return [sorted((HYMENOPTERA / split / cls).iterdir())[i] for split, cls, i in
            (("train", "ants", 0), ("train", "bees", 3), ("val", "ants", 5), ("val", "bees", 7))]


@pytest.mark.parametrize("key", list(WEIGHTS))
def test_metadata_read_from_torchvision_weights(key: str) -> None:
    p = preprocessing_from_torchvision(WEIGHTS[key])
    assert (p.resize_size, p.crop_size, p.interpolation) == EXPECTED[key]
    assert p.mean == pytest.approx((0.485, 0.456, 0.406)) and p.std == pytest.approx((0.229, 0.224, 0.225))


def test_resnet50_v1_and_v2_resize_differently() -> None:
    v1 = preprocessing_from_torchvision(models.ResNet50_Weights.IMAGENET1K_V1)
    v2_ = preprocessing_from_torchvision(models.ResNet50_Weights.IMAGENET1K_V2)
    assert (v1.resize_size, v2_.resize_size) == (256, 232)
    assert v1.crop_size == v2_.crop_size == 224


@pytest.mark.parametrize("key", list(WEIGHTS))
def test_eval_transform_equals_torchvision_on_generated_image(key: str) -> None:
    weights = WEIGHTS[key]
    image = _generated_image()
    ours = build_eval_transform(preprocessing_from_torchvision(weights))(image)
    theirs = weights.transforms()(image)
    crop = EXPECTED[key][1]
    assert ours.shape == theirs.shape == (3, crop, crop)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=1e-6)


@needs_hymenoptera
@pytest.mark.parametrize("key", list(WEIGHTS))
def test_eval_transform_equals_torchvision_on_real_images(key: str) -> None:
    weights = WEIGHTS[key]
    ours, theirs = build_eval_transform(preprocessing_from_torchvision(weights)), weights.transforms()
    for path in _real_images():
        image = load_image(path)
        a, b = ours(image), theirs(image)
        assert a.shape == b.shape == (3, EXPECTED[key][1], EXPECTED[key][1]), path
        assert torch.allclose(a, b, atol=1e-6), path


@needs_hymenoptera
def test_v1_and_v2_give_different_tensors_on_a_real_image() -> None:
    """The 256 vs 232 resize is not cosmetic: the network sees a different input."""
    image = load_image(_real_images()[0])
    a = build_eval_transform(preprocessing_from_torchvision(models.ResNet50_Weights.IMAGENET1K_V1))(image)
    b = build_eval_transform(preprocessing_from_torchvision(models.ResNet50_Weights.IMAGENET1K_V2))(image)
    assert a.shape == b.shape and (a - b).abs().mean() > 0.05


def _uniform(rgb: tuple[float, float, float], size: tuple[int, int] = (90, 70)) -> Image.Image:
    return Image.new("RGB", size, tuple(round(c) for c in rgb))


@pytest.mark.parametrize("build", [build_eval_transform, build_train_transform], ids=["eval", "train"])
def test_transforms_normalize_with_the_checkpoint_statistics(build) -> None:
    p = ImagePreprocessing(40, 32, "bilinear", (0.5, 0.4, 0.3), (0.2, 0.25, 0.1))
    transform = build(p)
    half_step = 0.5 / 255 / min(p.std)  # uint8 rounding of the uniform colour
    at_mean = transform(_uniform(tuple(255 * m for m in p.mean)))
    assert at_mean.shape == (3, 32, 32)
    assert at_mean.abs().max() <= half_step + 1e-6
    one_std_up = transform(_uniform(tuple(255 * (m + s) for m, s in zip(p.mean, p.std, strict=True))))
    assert torch.allclose(one_std_up, torch.ones_like(one_std_up), atol=half_step + 1e-6)


@pytest.mark.parametrize("augment", ["none", "trivialaugment", "randaugment"])
def test_train_transform_random_crop_at_checkpoint_size(augment: str) -> None:
    p = ImagePreprocessing(260, 48, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    transform = build_train_transform(p, augment)  # type: ignore[arg-type]
    crop = next(t for t in transform.transforms if isinstance(t, v2.RandomResizedCrop))
    assert crop.size == (48, 48) and crop.interpolation == v2.InterpolationMode.BICUBIC
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in transform.transforms)
    torch.manual_seed(0)
    image = _generated_image()
    outs = [transform(image) for _ in range(3)]
    assert all(o.shape == (3, 48, 48) and o.dtype == torch.float32 for o in outs)
    assert not torch.equal(outs[0], outs[1]), "train transform is not random"


def test_train_transform_unknown_augment_names_key_and_choices() -> None:
    with pytest.raises(ValueError, match=r"data\.augment.*trivialaugment.*'autoaugment'"):
        build_train_transform(DEFAULT_PREPROCESSING, "autoaugment")  # type: ignore[arg-type]


# ------------------------------------------------------------------ precedence: override > checkpoint > default


def test_precedence_levels() -> None:
    assert resolve_preprocessing(None, None, DEFAULT_PREPROCESSING) == DEFAULT_PREPROCESSING
    assert resolve_preprocessing(None, CKPT, DEFAULT_PREPROCESSING) == CKPT
    assert resolve_preprocessing({}, CKPT, DEFAULT_PREPROCESSING) == CKPT
    explicit = ImagePreprocessing(300, 256, "nearest", (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    assert resolve_preprocessing(explicit, CKPT, DEFAULT_PREPROCESSING) == explicit


def test_partial_override_wins_field_by_field() -> None:
    p = resolve_preprocessing({"crop_size": 160, "mean": [0.1, 0.2, 0.3], "std": None}, CKPT, DEFAULT_PREPROCESSING)
    assert p.crop_size == 160 and p.mean == (0.1, 0.2, 0.3)
    assert (p.resize_size, p.interpolation, p.std) == (CKPT.resize_size, CKPT.interpolation, CKPT.std)
    q = resolve_preprocessing({"interpolation": "bicubic"}, None, DEFAULT_PREPROCESSING)
    assert q == ImagePreprocessing(256, 224, "bicubic", DEFAULT_PREPROCESSING.mean, DEFAULT_PREPROCESSING.std)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"crop_size": 0}, r"preprocessing\.crop_size must be a positive integer, got 0"),
        ({"resize_size": 224.5}, r"preprocessing\.resize_size .*224\.5"),
        ({"resize_size": True}, r"preprocessing\.resize_size .*True"),
        ({"interpolation": "lanczos"}, r"preprocessing\.interpolation must be one of \['bicubic', 'bilinear', "
                                       r"'nearest'\], got 'lanczos'"),
        ({"mean": [0.5, 0.5]}, r"preprocessing\.mean must have 3 values.*0\.5, 0\.5\]"),
        ({"mean": 0.5}, r"preprocessing\.mean must have 3 values.*0\.5"),
        ({"std": ["a", "b", "c"]}, r"preprocessing\.std must have 3 values.*'a'"),
        ({"std": [0.2, 0.0, 0.2]}, r"preprocessing\.std must be positive"),
        ({"crop": 200}, r"unknown preprocessing key\(s\) \['crop'\]; valid keys are \['crop_mode', 'crop_size', "
                        r"'interpolation', 'mean', 'resize_size', 'std'\]"),
        ({"crop_mode": "border"}, r"preprocessing\.crop_mode must be one of \['center', 'squash'\], got 'border'"),
    ],
)
def test_invalid_override_names_key_and_value(override: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        resolve_preprocessing(override, CKPT, DEFAULT_PREPROCESSING)


def test_to_dict_from_dict_round_trip() -> None:
    d = CKPT.to_dict()
    assert d == {"modality": "image", "resize_size": 232, "crop_size": 224, "interpolation": "bicubic",
                 "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_mode": "center"}
    assert Preprocessing.from_dict(d) == CKPT
    through_json = json.loads(json.dumps(d))  # lists, as YAML / JSON hand them back
    assert Preprocessing.from_dict(through_json) == CKPT
    assert Preprocessing.from_dict(through_json).mean == (0.5, 0.4, 0.3)
    legacy = {k: v for k, v in d.items() if k != "modality"}  # checkpoints written before modalities existed
    assert Preprocessing.from_dict(legacy) == ImagePreprocessing.from_dict(legacy) == CKPT
    with pytest.raises(ValueError, match=r"preprocessing\.modality='audio' is unknown; valid: \[.*'image'"):
        Preprocessing.from_dict({**d, "modality": "audio"})
