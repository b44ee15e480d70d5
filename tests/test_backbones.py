"""Backbones: the contract every family keeps, weights resolution, and offline weight files."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TinyBackbone
from torch import nn

from transfer_lit import (
    Backbone,
    ModuleBackbone,
    Preprocessing,
    TorchvisionBackbone,
    TransferModule,
    WeightsNotAvailableError,
)
from transfer_lit.backbones import as_backbone, resolve_weights
from transfer_lit.backbones.torchvision import verify_hash, weight_file
from transfer_lit.preprocessing import preprocessing_from_torchvision

# name: (input side, num_features, first block, last block, (resize, crop, interpolation) of DEFAULT weights)
FAMILIES = {
    "resnet18": (64, 512, "stem", "layer4", (256, 224, "bilinear")),
    "resnext50_32x4d": (64, 2048, "stem", "layer4", (232, 224, "bilinear")),
    "wide_resnet50_2": (64, 2048, "stem", "layer4", (232, 224, "bilinear")),
    "mobilenet_v2": (64, 1280, "features.0", "features.18", (232, 224, "bilinear")),
    "mobilenet_v3_small": (64, 1024, "features.0", "classifier", (256, 224, "bilinear")),
    "efficientnet_b0": (64, 1280, "features.0", "features.8", (256, 224, "bicubic")),
    "efficientnet_v2_s": (64, 1280, "features.0", "features.7", (384, 384, "bilinear")),
    "convnext_tiny": (64, 768, "features.0", "classifier", (236, 224, "bilinear")),
    "regnet_y_400mf": (64, 440, "stem", "block4", (232, 224, "bilinear")),
    "densenet121": (64, 1024, "features.conv0", "features.norm5", (256, 224, "bilinear")),
    "vit_b_16": (224, 768, "stem", "norm", (256, 224, "bilinear")),  # fixed patch grid: needs its own 224
    "swin_t": (64, 768, "features.0", "norm", (232, 224, "bicubic")),
    # generic fallback over top-level children / a `features` or `layers` Sequential
    "alexnet": (64, 4096, "features.0", "classifier", (256, 224, "bilinear")),
    "googlenet": (64, 1024, "conv1", "inception5b", (256, 224, "bilinear")),
    "squeezenet1_1": (64, 512, "features.0", "features.12", (256, 224, "bilinear")),
    "mnasnet0_5": (64, 1280, "layers.0", "layers.15", (256, 224, "bilinear")),
}
# Slow to initialise or to run on CPU: built and run on the meta device (real structure and shapes, no
# data), which keeps the suite fast. The others run for real, so their output is also checked finite.
ON_META = {"resnext50_32x4d", "wide_resnet50_2", "efficientnet_v2_s", "convnext_tiny", "vit_b_16", "swin_t",
           "alexnet", "googlenet"}


class Built:
    """A family's backbone after one forward pass, with the order its parametrised modules first ran in."""

    def __init__(self, name: str) -> None:
        self.name = name
        device = torch.device("meta" if name in ON_META else "cpu")
        torch.manual_seed(0)
        with device:
            self.backbone = TorchvisionBackbone(name, weights=None).eval()
        calls: list[nn.Module] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod)) for m in self.backbone.modules()
                 if any(True for _ in m.parameters(recurse=False))]
        side = FAMILIES[name][0]
        with torch.no_grad():
            self.output = self.backbone(torch.randn(2, 3, side, side, device=device))
        for h in hooks:
            h.remove()
        self.first_call = {id(m): i for i, m in reversed(list(enumerate(calls)))}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Each family built once with random init, with an empty torch hub cache (proves it needs no file)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        mp.setenv("TRANSFER_LIT_OFFLINE", "1")
        built = Built(request.param)
    yield built


def test_forward_gives_pooled_features_of_declared_width(family: Built) -> None:
    width = FAMILIES[family.name][1]
    assert family.backbone.num_features == width
    assert family.output.shape == (2, width)
    if family.name not in ON_META:
        assert torch.isfinite(family.output).all()


def test_every_parameter_in_exactly_one_block(family: Built) -> None:
    backbone = family.backbone
    blocks = backbone.block_params()
    assert list(blocks) == backbone.block_names()
    assert len(blocks) >= 3, f"too coarse for layer-wise LRs / unfreezing: {list(blocks)}"
    ids = [id(p) for params in blocks.values() for _, p in params]
    assert len(ids) == len(set(ids)), "a parameter is in two blocks"
    assert set(ids) == {id(p) for p in backbone.parameters()}
    assert all(params for params in blocks.values())


def test_blocks_are_ordered_input_to_output(family: Built) -> None:
    _, _, first, last, _ = FAMILIES[family.name]
    names = family.backbone.block_names()
    assert (names[0], names[-1]) == (first, last)
    first_use = []
    for block in names:
        used = [family.first_call[id(m)] for m in family.backbone.block_modules(block) if id(m) in family.first_call]
        assert used, f"block {block} of {family.name} holds no module the forward pass runs"
        first_use.append(min(used))
    assert first_use == sorted(first_use), f"blocks not in forward order: {dict(zip(names, first_use, strict=True))}"


def test_preprocessing_resolves_offline_from_default_weights_metadata(family: Built) -> None:
    resize, crop, interpolation = FAMILIES[family.name][4]
    p = family.backbone.preprocessing
    assert p is not None
    assert (p.resize_size, p.crop_size, p.interpolation) == (resize, crop, interpolation)
    assert p == preprocessing_from_torchvision(torchvision.models.get_model_weights(family.name).DEFAULT)
    assert p.mean == pytest.approx((0.485, 0.456, 0.406)) and p.std == pytest.approx((0.229, 0.224, 0.225))


# ------------------------------------------------------------------ user backbones


class UserNet(Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.act = nn.ReLU()  # no parameters: no block
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.act(self.conv(x * self.scale)))


def test_user_backbone_subclass_default_blocks() -> None:
    net = UserNet()
    assert as_backbone(net) is net
    blocks = net.block_params()
    # parameters registered on the backbone itself form a leading "stem"; "act" has none, so no block
    assert list(blocks) == ["stem", "conv", "body"]
    assert [n for n, _ in blocks["stem"]] == ["scale"]
    assert [n for n, _ in blocks["body"]] == ["body.0.weight", "body.0.bias"]
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 6)


def test_tiny_user_backbone_blocks() -> None:
    blocks = TinyBackbone().block_params()
    assert list(blocks) == ["stem", "block1", "block2"]
    assert [n for n, _ in blocks["stem"]] == ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]


def test_plain_module_with_num_features_is_wrapped() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 7, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    plain.num_features = 7  # type: ignore[assignment]
    backbone = as_backbone(plain)
    assert isinstance(backbone, ModuleBackbone)
    assert backbone.num_features == 7 and backbone.preprocessing is None
    assert backbone.block_names() == ["0", "2"]
    assert {id(p) for _, ps in backbone.block_params().items() for _, p in ps} == {id(p) for p in plain.parameters()}
    assert backbone(torch.randn(2, 3, 12, 12)).shape == (2, 7)


def test_plain_module_without_num_features_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"model\.backbone.*Sequential.*num_features"):
        as_backbone(nn.Sequential(nn.Linear(2, 2)))


def test_blocks_reject_overlapping_and_orphan_parameters() -> None:
    class Overlap(TinyBackbone):
        def block_specs(self):  # type: ignore[override]
            return [("a", ("stem", "block1")), ("b", ("block1", "block2"))]

    class Orphan(TinyBackbone):
        def block_specs(self):  # type: ignore[override]
            return [("a", ("stem",)), ("b", ("block2",))]

    with pytest.raises(ValueError, match=r"block1\.0\.weight.*\['a', 'b'\]"):
        Overlap().block_params()
    with pytest.raises(ValueError, match=r"no block.*block1\.0\.weight"):
        Orphan().block_params()


# ------------------------------------------------------------------ weights resolution


def test_resolve_weights_enum_default_and_none() -> None:
    W = torchvision.models.ResNet50_Weights
    assert resolve_weights("resnet50", "IMAGENET1K_V1") is W.IMAGENET1K_V1
    assert resolve_weights("resnet50", "IMAGENET1K_V2") is W.IMAGENET1K_V2
    assert resolve_weights("resnet50", "DEFAULT") is W.IMAGENET1K_V2
    for value in (None, "null", "None", "random"):
        assert resolve_weights("resnet50", value) is None


def test_unknown_backbone_name_names_key_value_and_suggests() -> None:
    with pytest.raises(ValueError) as info:
        TorchvisionBackbone("resnet5", weights=None)
    message = str(info.value)
    assert "model.backbone.name" in message and "'resnet5'" in message
    assert "'resnet50'" in message  # close match suggested
    assert "list_models" in message


def test_unknown_weights_lists_valid_values() -> None:
    with pytest.raises(ValueError) as info:
        resolve_weights("resnet50", "IMAGENET1K_V3")
    message = str(info.value)
    for expected in ("model.backbone.weights", "'IMAGENET1K_V3'", "IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"):
        assert expected in message


def test_missing_local_weight_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"model\.backbone\.weights.*nope\.pth"):
        TorchvisionBackbone("resnet18", weights=str(missing))


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict+module."])
def test_local_state_dict_file_is_loaded(tmp_path: Path, wrap: str) -> None:
    state = _resnet18_state(seed=123)
    saved: object = state
    if wrap != "plain":  # what DataParallel / Lightning-style checkpoints look like
        saved = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    path = tmp_path / "my_resnet18.pth"
    torch.save(saved, path)
    torch.manual_seed(0)
    backbone = TorchvisionBackbone("resnet18", weights=str(path))
    assert torch.equal(backbone.model.conv1.weight, state["conv1.weight"])
    assert torch.equal(backbone.model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert not torch.equal(TorchvisionBackbone("resnet18", weights=None).model.conv1.weight, state["conv1.weight"])
    assert backbone.preprocessing == preprocessing_from_torchvision(torchvision.models.ResNet18_Weights.DEFAULT)


def test_local_file_of_wrong_shapes_is_a_clear_error(tmp_path: Path) -> None:
    state = _resnet18_state(seed=0)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del state["layer1.0.bn1.running_mean"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        TorchvisionBackbone("resnet18", weights=str(path))
    message = str(info.value)
    assert "model.backbone.weights" in message and "bad.pth" in message
    assert "conv1.weight" in message and "layer1.0.bn1.running_mean" in message


def test_local_file_without_state_dict_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        TorchvisionBackbone("resnet18", weights=str(path))


# ------------------------------------------------------------------ weight files in the torch hub cache


def test_offline_missing_weight_file_fails_fast_naming_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(WeightsNotAvailableError) as info:
        TorchvisionBackbone("resnet18", weights="DEFAULT")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in message
    assert "TORCH_HOME" in message
    assert not (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()


def test_corrupt_weight_file_in_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weight_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint" * 1000)
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth is corrupt: its sha256") as info:
        TorchvisionBackbone("resnet18", weights="IMAGENET1K_V1")
    assert "'f37072fd'" in str(info.value) and "delete it" in str(info.value)


def test_verify_hash_checks_the_prefix_in_the_name(tmp_path: Path) -> None:
    data = b"some weights"
    prefix = hashlib.sha256(data).hexdigest()[:8]
    good = tmp_path / f"net-{prefix}.pth"
    good.write_bytes(data)
    verify_hash(good)  # passes
    bad = tmp_path / f"net-{'0' * 8 if prefix != '0' * 8 else '1' * 8}.pth"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="corrupt"):
        verify_hash(bad)
    unnamed = tmp_path / "weights.pth"  # no hash in the name: nothing to check
    unnamed.write_bytes(data)
    verify_hash(unnamed)


MOBILENET_V2 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1


def _cached_mobilenet_v2() -> Path:
    path = weight_file(MOBILENET_V2)
    if not path.is_file():
        pytest.skip(f"{path.name} not in the torch hub cache ({path.parent}); scripts/fetch_offline_assets.sh puts it")
    return path


def test_real_mobilenet_v2_weights_load_from_cache() -> None:
    path = _cached_mobilenet_v2()
    verify_hash(path)
    backbone = TorchvisionBackbone("mobilenet_v2", weights="IMAGENET1K_V1")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(backbone.model.features[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(backbone.model.features[18][1].running_mean, state["features.18.1.running_mean"])
    p = backbone.preprocessing
    assert p is not None and (p.resize_size, p.crop_size, p.interpolation) == (256, 224, "bilinear")
    assert backbone.num_features == 1280


def test_real_mobilenet_v2_file_with_one_flipped_byte_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _cached_mobilenet_v2()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = weight_file(MOBILENET_V2)
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    verify_hash(target)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        TorchvisionBackbone("mobilenet_v2", weights="IMAGENET1K_V1")


def test_preprocessing_of_enum_weights_follows_the_weights() -> None:
    """V1 and V2 of the same architecture differ in resize size; the backbone must carry which."""
    v1 = preprocessing_from_torchvision(torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    v2 = preprocessing_from_torchvision(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert (v1.resize_size, v2.resize_size) == (256, 232)
    assert isinstance(v1, Preprocessing)


class _ViTLike(Backbone):
    """timm's ViT names its transformer blocks ``blocks``: no Backbone method may shadow a child of that name."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(12, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.patch_embed(x)))


def test_a_child_module_named_blocks_is_a_block_like_any_other() -> None:
    net = _ViTLike()
    assert isinstance(net.blocks, nn.Sequential)
    assert net.block_names() == ["patch_embed", "blocks", "norm"]
    assert [n for n, _ in net.block_params()["blocks"]] == ["blocks.0.weight", "blocks.0.bias", "blocks.2.weight",
                                                             "blocks.2.bias"]
    model = TransferModule(net, num_classes=2, mode="progressive")
    model.set_frozen_blocks(["patch_embed"])
    assert not net.patch_embed.weight.requires_grad and net.blocks[0].weight.requires_grad
    assert model(torch.randn(4, 12)).shape == (4, 2)
