"""TimmBackbone (transfer_lit.backbones.timm): timm's own metadata as the preprocessing, the blocks and the
weight-decay exclusions, checked against timm itself; random init and files saved here (no ImageNet weights
are reachable offline)."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HYMENOPTERA
from PIL import Image
from torchvision.transforms import v2

from transfer_lit import ImagePreprocessing, TransferModule, WeightsNotAvailableError, build_eval_transform
from transfer_lit.data.feature_cache import cache_key
from transfer_lit.param_groups import LearningRatePolicy, build_param_groups
from transfer_lit.preprocessing import build_train_transform

timm = pytest.importorskip("timm", reason="the [timm] extra is not installed")
from transfer_lit.backbones.timm import TimmBackbone, preprocessing_from_timm  # noqa: E402

# Families with tiny inputs where the model allows it (kwargs for timm.create_model).
FAMILIES: dict[str, dict[str, Any]] = {
    "resnet18": {}, "convnext_atto": {}, "convnextv2_atto": {}, "efficientnet_b0": {}, "mobilenetv3_small_050": {},
    "regnetx_002": {}, "densenet121": {}, "ghostnet_100": {}, "mobilevit_xxs": {}, "levit_128s": {"img_size": 64},
    "vit_tiny_patch16_224": {"img_size": 32}, "deit_tiny_patch16_224": {"img_size": 32},
    "eva02_tiny_patch14_224": {"img_size": 28}, "beit_base_patch16_224": {"img_size": 32},
    "cait_xxs24_224": {"img_size": 32}, "swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 2},
    "pit_ti_224": {"img_size": 224},  # no group_matcher(): its top-level children are the blocks
}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Odd-sized photos (real ones from ../shared when present) and generated images, portrait and landscape."""
    rng = random.Random(0)
    made = []
    for w, h in ((333, 250), (250, 401), (64, 48), (517, 517)):
        image = Image.new("RGB", (w, h))
        image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(w * h)])
        made.append(image)
    real = sorted(HYMENOPTERA.rglob("*.jpg"))[:4] if HYMENOPTERA.is_dir() else []
    return made + [Image.open(p).convert("RGB") for p in real]


# ------------------------------------------------------------------ preprocessing from pretrained_cfg


@pytest.mark.parametrize("name", [
    "vit_small_patch16_224.augreg_in21k_ft_in1k",  # 224, crop_pct 0.9, bicubic, mean = std = 0.5
    "convnext_atto.d2_in1k",  # crop_pct 0.875, bicubic, ImageNet statistics
    "efficientnet_b3.ra2_in1k",  # its own input size, 288
    "resnet50.a1_in1k",  # crop_pct 0.95
    "coat_lite_mini.in1k",  # crop_mode squash
])
def test_eval_transform_equals_timms_own(name: str, images: list[Image.Image]) -> None:
    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    p = preprocessing_from_timm(config, name)
    assert (p.crop_size, p.interpolation, p.mean, p.std) == (config["input_size"][1], config["interpolation"],
                                                            tuple(config["mean"]), tuple(config["std"]))
    theirs, ours = timm.data.create_transform(**config), build_eval_transform(p)
    theirs_u8 = timm.data.create_transform(**config, use_prefetcher=True)  # stops at uint8, like ours
    for image in images:
        assert torch.equal(build_eval_transform(p, normalize=False)(image), theirs_u8(image))
        assert torch.allclose(ours(image), theirs(image), atol=1e-5, rtol=0)


def test_the_train_transform_keeps_size_interpolation_and_statistics() -> None:
    p = TimmBackbone("vit_small_patch16_224.augreg_in21k_ft_in1k", weights=None).preprocessing
    assert p is not None
    steps = build_train_transform(p).transforms
    crop = next(t for t in steps if isinstance(t, v2.RandomResizedCrop))
    normalize = next(t for t in steps if isinstance(t, v2.Normalize))
    assert list(crop.size) == [224, 224] and crop.interpolation.value == "bicubic"
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.5, 0.5, 0.5)


def test_an_img_size_given_to_timm_sets_the_crop_and_the_eval_transform_feeds_the_model(
        images: list[Image.Image]) -> None:
    backbone = TimmBackbone("vit_tiny_patch16_224", weights=None, model_kwargs={"img_size": 160}).eval()
    assert backbone.preprocessing is not None and backbone.preprocessing.crop_size == 160
    x = torch.stack([build_eval_transform(backbone.preprocessing)(image) for image in images[:2]])
    assert backbone(x).shape == (2, backbone.num_features)


def test_deprecated_and_hub_names_are_left_to_timm() -> None:
    from transfer_lit.backbones.timm import _check_name

    _check_name(timm, "convnext_tiny_in22ft1k")  # timm maps it to convnext_tiny.fb_in22k_ft_in1k
    _check_name(timm, "hf-hub:timm/resnet18.a1_in1k")


def test_what_cannot_be_reproduced_is_refused_naming_the_value() -> None:
    base = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
            "crop_pct": 1.0}
    with pytest.raises(ValueError, match=r"crop_mode 'border' is not supported"):
        preprocessing_from_timm({**base, "crop_mode": "border"})
    with pytest.raises(ValueError, match=r"input_size \(3, 224, 160\) is not square"):
        preprocessing_from_timm({**base, "input_size": (3, 224, 160)})
    with pytest.raises(ValueError, match=r"interpolation 'lanczos' is not supported"):
        preprocessing_from_timm({**base, "interpolation": "lanczos"})
    assert preprocessing_from_timm(base) == ImagePreprocessing(224, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)


# ------------------------------------------------------------------ the backbone contract, per family


@pytest.mark.parametrize("name", list(FAMILIES))
def test_contract(name: str, one_thread: None) -> None:
    torch.manual_seed(0)
    backbone = TimmBackbone(name, weights=None, model_kwargs=FAMILIES[name])
    size = FAMILIES[name].get("img_size", 64)
    assert backbone(torch.randn(2, 3, size, size)).shape == (2, backbone.num_features)
    blocks = backbone.block_params()  # raises if a parameter is in no block or in two
    assert sum(len(ps) for ps in blocks.values()) == len(list(backbone.parameters())) and len(blocks) >= 4
    config = timm.data.resolve_data_config({"input_size": (3, size, size)} if "img_size" in FAMILIES[name] else {},
                                           model=backbone.model)
    assert backbone.preprocessing == preprocessing_from_timm(config, name)  # from pretrained_cfg, offline
    assert backbone.preprocessing is not None and backbone.preprocessing.crop_size == config["input_size"][1]

    model = TransferModule(backbone, num_classes=3, mode="progressive", lr=0.1, backbone_lr_mult=1.0)
    names = backbone.block_names()
    model.set_frozen_blocks(names[:-1])  # thaw the output-side block, as the first phase does
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = model.configure_optimizers()
    model.train()
    loss = model.loss(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    model.frozen.hold(optimizer)
    optimizer.step()
    last = {n for n, _ in blocks[names[-1]]}
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        short = n.removeprefix("backbone.")
        if short in last:
            assert p.requires_grad
        elif n.startswith("backbone."):
            assert not moved and not p.requires_grad, n
    assert any(not torch.equal(before[f"backbone.{n}"], dict(model.named_parameters())[f"backbone.{n}"])
               for n in last)

    probe = TransferModule(backbone, num_classes=3, mode="linear_probe")
    key = cache_key(probe, backbone.preprocessing, [], "32-true")
    with torch.no_grad():
        next(backbone.parameters()).add_(1e-3)
    assert cache_key(probe, backbone.preprocessing, [], "32-true") != key  # other weights, other features


# ------------------------------------------------------------------ layer-wise LR decay and weight decay as timm


def _ours(backbone: TimmBackbone, decay: float, weight_decay: float) -> dict[str, tuple[float, float]]:
    groups = build_param_groups(backbone, torch.nn.Linear(backbone.num_features, 2),
                                LearningRatePolicy(lr=1.0, backbone_lr_mult=1.0, layer_decay=decay,
                                                   weight_decay=weight_decay))
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in backbone.model.named_parameters()}


def _timms(model: torch.nn.Module, decay: float, weight_decay: float) -> dict[str, tuple[float, float]]:
    from timm.optim import param_groups_layer_decay

    declared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=decay,
                                      no_weight_decay_list=declared)
    by_id = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize(("name", "groups"), [("vit_tiny_patch16_224", "coarse"), ("deit_tiny_patch16_224", "coarse"),
                                              ("eva02_tiny_patch14_224", "coarse"), ("resnet18", "fine"),
                                              ("convnext_atto", "fine"), ("efficientnet_b0", "fine")])
def test_layer_decay_gives_timms_per_parameter_scales(name: str, groups: str) -> None:
    backbone = TimmBackbone(name, weights=None, groups=groups)  # type: ignore[arg-type]
    ours, theirs = _ours(backbone, 0.7, 0.05), _timms(backbone.model, 0.7, 0.05)
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert ours[n][0] == pytest.approx(theirs[n][0], rel=1e-9), n
        assert ours[n][1] == theirs[n][1], n  # same exclusions: 1-D, norms, the model's no_weight_decay()
    assert min(lr for lr, _ in ours.values()) == pytest.approx(0.7 ** (len(backbone.block_names()) - 1))


# ------------------------------------------------------------------ weights: local files, the hub cache, offline


def test_a_local_file_loads_through_timms_overlay(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet18")  # with its 1000-class classifier: timm drops it for num_classes=0
    source.eval()
    x = torch.randn(2, 3, 64, 64)
    expected = source.forward_head(source.forward_features(x), pre_logits=True)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    save_file(source.state_dict(), tmp_path / "resnet18.safetensors")
    for file in ("resnet18.pth", "resnet18.safetensors"):
        backbone = TimmBackbone("resnet18", weights=str(tmp_path / file)).eval()
        assert torch.allclose(backbone(x), expected, atol=1e-6), file
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth' could not be loaded into resnet18"):
        TimmBackbone("resnet18", weights=str(tmp_path / "other.pth"))


def test_pretrained_reads_the_hugging_face_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from safetensors.torch import save_file

    snapshot = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0123abcd")
    torch.manual_seed(2)
    source = timm.create_model("resnet18.a1_in1k")
    save_file(source.state_dict(), snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    backbone = TimmBackbone("resnet18.a1_in1k", weights="pretrained")  # TRANSFER_LIT_OFFLINE=1 (conftest)
    assert torch.equal(backbone.model.conv1.weight, source.conv1.weight)
    assert backbone.preprocessing is not None and backbone.preprocessing.resize_size == math.floor(224 / 0.95)


def test_missing_pretrained_weights_fail_at_once_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.monotonic()
    with pytest.raises(WeightsNotAvailableError, match=r"timm's weights for convnext_atto\.d2_in1k are not cached "
                                                       r"and the network is unreachable.*timm/convnext_atto\.d2_in1k"):
        TimmBackbone("convnext_atto.d2_in1k", weights="pretrained")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"name": "resnet_18"}, r"model\.backbone\.name='resnet_18' is not a timm model\. Did you mean 'resnet18'"),
    ({"name": "resnet18.a9_in1k"}, r"resnet18 has no pretrained tag 'a9_in1k'\. Did you mean .*'a1_in1k'.*Valid tags"),
    ({"name": "resnet18", "weights": "IMAGENET1K_V1"}, r"valid values for a timm backbone are 'pretrained', null"),
    ({"name": "resnet18", "weights": "/no/such/file.pth"}, r"weights='/no/such/file\.pth': no such file"),
    ({"name": "resnet18", "groups": "medium"}, r"groups must be 'coarse' or 'fine', got 'medium'"),
])
def test_bad_names_get_one_clear_error(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        TimmBackbone(**{"weights": None, **kwargs})
