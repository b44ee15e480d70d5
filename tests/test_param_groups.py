"""Named parameter groups: decay split, LR policy, membership by identity, and the LR gate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import Backbone, TransferModule
from transfer_lit.freezing import group_by_name, install_lr_gate, set_gate
from transfer_lit.heads import LinearHead
from transfer_lit.param_groups import LearningRatePolicy, build_param_groups
from transfer_lit.speed import prefer_fused

NAMES = [
    "backbone.stem", "backbone.stem.no_decay",
    "backbone.block1", "backbone.block1.no_decay",
    "backbone.block2", "backbone.block2.no_decay",
    "head", "head.no_decay",
]


def _optimizer(model: TransferModule) -> torch.optim.Optimizer:
    configured = model.configure_optimizers()
    return configured["optimizer"] if isinstance(configured, dict) else configured


def _ids(params) -> list[int]:  # type: ignore[no-untyped-def]
    return [id(p) for p in params]


def test_group_names_and_decay_split() -> None:
    torch.manual_seed(0)
    groups = build_param_groups(TinyBackbone(), LinearHead(16, 3), LearningRatePolicy(weight_decay=0.05))
    assert [g["name"] for g in groups] == NAMES
    for group in groups:
        if group["name"].endswith(".no_decay"):
            assert group["weight_decay"] == 0.0
            assert all(p.ndim <= 1 for p in group["params"]), group["name"]
        else:
            assert group["weight_decay"] == 0.05
            assert all(p.ndim > 1 for p in group["params"]), group["name"]
        assert group["gate"] == 1.0 and group["block"] == group["name"].removesuffix(".no_decay")


def test_tokens_and_position_embeddings_get_no_weight_decay() -> None:
    class TokenNet(Backbone):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embedding = nn.Parameter(torch.zeros(1, 5, 4))
            self.proj = nn.Linear(4, 4)
            self.num_features = 4

    groups = {g["name"]: g for g in build_param_groups(TokenNet(), nn.Linear(4, 2), LearningRatePolicy())}
    net_params = dict(TokenNet().named_parameters())
    assert set(net_params) == {"cls_token", "pos_embedding", "proj.weight", "proj.bias"}
    stem_no_decay = groups["backbone.stem.no_decay"]["params"]
    assert [p.shape for p in stem_no_decay] == [(1, 1, 4), (1, 5, 4)]
    assert "backbone.stem" not in groups  # 3-D tokens are not weights to decay
    assert [p.shape for p in groups["backbone.proj"]["params"]] == [(4, 4)]


def test_learning_rates_follow_head_multiplier_and_layer_decay() -> None:
    model = TransferModule(TinyBackbone(), num_classes=3, lr=2e-3, backbone_lr_mult=0.1, layer_decay=0.5)
    lrs = {name: g["lr"] for name, g in group_by_name(_optimizer(model)).items()}
    expected = {"head": 2e-3, "backbone.block2": 2e-4, "backbone.block1": 1e-4, "backbone.stem": 5e-5}
    for name, lr in expected.items():
        assert lrs[name] == pytest.approx(lr, rel=1e-12)
        assert lrs[f"{name}.no_decay"] == pytest.approx(lr, rel=1e-12)
    assert min(lrs, key=lrs.__getitem__).startswith("backbone.stem")


def test_default_optimizer_is_adamw_with_the_classic_recipe() -> None:
    optimizer = _optimizer(TransferModule(TinyBackbone(), num_classes=3))
    assert type(optimizer) is torch.optim.AdamW
    for group in optimizer.param_groups:
        expected_lr = 1e-3 if group["name"].startswith("head") else 1e-5
        assert group["lr"] == pytest.approx(expected_lr, rel=1e-12), group["name"]
        assert group["weight_decay"] == (0.0 if group["name"].endswith("no_decay") else 0.01)


@pytest.mark.parametrize("mode", ["finetune", "linear_probe", "progressive"])
def test_every_parameter_in_exactly_one_group_from_step_zero(mode: str) -> None:
    model = TransferModule(TinyBackbone(), num_classes=3, mode=mode)
    optimizer = _optimizer(model)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(_ids(model.parameters()))
    assert [g["name"] for g in optimizer.param_groups] == NAMES
    gates = {g["name"]: g["gate"] for g in optimizer.param_groups}
    frozen = mode != "finetune"
    assert all(gates[n] == (0.0 if frozen and n.startswith("backbone") else 1.0) for n in NAMES), gates


def test_shared_parameter_between_backbone_and_head_is_rejected() -> None:
    backbone = TinyBackbone()
    head = nn.Sequential(backbone.block2[1], nn.Linear(16, 3))
    with pytest.raises(ValueError, match="shared between the backbone and the head"):
        build_param_groups(backbone, head, LearningRatePolicy())


def test_parameters_with_equal_values_in_different_groups_are_both_trained() -> None:
    torch.manual_seed(0)
    model = TransferModule(TinyBackbone(width=3), num_classes=3, lr=0.05, backbone_lr_mult=1.0)
    same = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        model.head[0].bias.copy_(same)
        model.backbone.stem[1].bias.copy_(same)  # BatchNorm bias: same shape and values as the head bias
        model.backbone.stem[0].bias.copy_(same)
    head_bias, bn_bias = model.head[0].bias, model.backbone.stem[1].bias
    groups = group_by_name(_optimizer(model))
    assert id(head_bias) in _ids(groups["head.no_decay"]["params"])
    assert id(bn_bias) in _ids(groups["backbone.stem.no_decay"]["params"])
    assert id(bn_bias) not in _ids(groups["head.no_decay"]["params"])

    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(24, 3, 16, 16, generator=gen), torch.arange(24) % 3), batch_size=8)
    Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(model, train_dataloaders=loader)
    assert not torch.equal(head_bias.detach(), same)
    assert not torch.equal(bn_bias.detach(), same)
    assert not torch.equal(head_bias.detach(), bn_bias.detach())


# ------------------------------------------------------------------ the LR gate


def _gated_sgd(gates: tuple[float, float], scale: float = 1.0) -> tuple[torch.optim.SGD, nn.Parameter, nn.Parameter]:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([
        {"params": [a], "lr": 0.1, "name": "backbone.x", "block": "backbone.x", "gate": gates[0]},
        {"params": [b], "lr": 0.1, "name": "head", "block": "head", "gate": gates[1]},
    ])
    install_lr_gate(optimizer, lambda: scale)
    a.grad, b.grad = torch.ones(2), torch.full((2,), 2.0)
    return optimizer, a, b


def test_gate_scales_the_lr_used_by_the_step_and_restores_it() -> None:
    optimizer, a, b = _gated_sgd((0.5, 1.0))
    optimizer.step()
    assert torch.allclose(a.detach(), torch.full((2,), -0.05))  # 0.1 x 0.5 x grad 1
    assert torch.allclose(b.detach(), torch.full((2,), -0.2))  # 0.1 x 1 x grad 2
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1]


def test_lr_scale_multiplies_every_group() -> None:
    optimizer, a, b = _gated_sgd((1.0, 1.0), scale=0.25)
    optimizer.step()
    assert torch.allclose(a.detach(), torch.full((2,), -0.025))
    assert torch.allclose(b.detach(), torch.full((2,), -0.05))
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1]


def test_zero_gate_holds_parameters_still() -> None:
    optimizer, a, b = _gated_sgd((0.0, 1.0))
    optimizer.step()
    assert torch.equal(a.detach(), torch.zeros(2))  # the gate only scales the LR: the gradient stays for the hold
    assert torch.allclose(b.detach(), torch.full((2,), -0.2))


def test_scheduler_sees_the_ungated_lr() -> None:
    optimizer, _, _ = _gated_sgd((0.5, 1.0))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.01])


def test_set_gate_validates_block_and_value() -> None:
    optimizer, _, _ = _gated_sgd((1.0, 1.0))
    set_gate(optimizer, "backbone.x", 0.3)
    assert optimizer.param_groups[0]["gate"] == 0.3
    with pytest.raises(KeyError, match=r"'backbone\.y'.*\['backbone\.x', 'head'\]"):
        set_gate(optimizer, "backbone.y", 1.0)
    with pytest.raises(ValueError, match=r"gate must be in \[0, 1\], got 1\.5"):
        set_gate(optimizer, "head", 1.5)


@pytest.mark.parametrize(("key", "value"), [("lr", 0.0), ("backbone_lr_mult", -1.0), ("layer_decay", 0.0)])
def test_policy_rejects_non_positive_values(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"model\.{key} must be positive, got {value}"):
        LearningRatePolicy(**{key: value})


def _fresh_groups() -> Any:
    torch.manual_seed(0)
    backbone, head = TinyBackbone(), LinearHead(16, 3)
    return lambda: build_param_groups(backbone, head, LearningRatePolicy(layer_decay=0.5))


def test_prefer_fused_rebuilds_an_unconfigured_adamw_with_the_same_groups_and_steps() -> None:
    groups = _fresh_groups()
    plain = torch.optim.AdamW(groups(), lr=3e-4, betas=(0.8, 0.99))
    fused = prefer_fused(plain, devices=("cpu",))  # CUDA is the default; the CPU has a fused kernel too
    assert type(fused) is torch.optim.AdamW and fused is not plain
    assert all(g["fused"] for g in fused.param_groups) and fused.defaults["betas"] == (0.8, 0.99)
    keys = ("name", "lr", "weight_decay", "gate")
    assert [[g[k] for k in keys] for g in fused.param_groups] == [[g[k] for k in keys] for g in plain.param_groups]
    assert [[id(p) for p in g["params"]] for g in fused.param_groups] == [[id(p) for p in g["params"]]
                                                                         for g in plain.param_groups]
    # One step of each from the same weights and gradients lands on the same weights.
    params = [p for g in plain.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for optimizer in (plain, fused):
        with torch.no_grad():
            for p, s, g in zip(params, start, grads, strict=True):
                p.copy_(s)
                p.grad = g.clone()
        optimizer.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs", [{"foreach": False}, {"fused": False}, {"differentiable": False, "foreach": True}])
def test_prefer_fused_keeps_what_the_user_chose(kwargs: dict[str, Any]) -> None:
    groups = _fresh_groups()
    chosen = torch.optim.AdamW(groups(), **kwargs)
    assert prefer_fused(chosen, devices=("cpu",)) is chosen
    sgd = torch.optim.SGD(groups(), lr=0.1)
    assert prefer_fused(sgd, devices=("cpu",)) is sgd
    plain = torch.optim.AdamW(groups())
    assert prefer_fused(plain) is plain  # default devices: CUDA only, these parameters are on the CPU


def test_prefer_fused_keeps_the_groups_the_users_factory_made() -> None:
    groups = _fresh_groups()
    extra = nn.Parameter(torch.ones(3))
    made = groups()
    made[0]["betas"] = (0.8, 0.9)
    plain = torch.optim.AdamW([*made, {"params": [extra], "name": "extra"}])
    fused = prefer_fused(plain, devices=("cpu",))
    assert fused is not plain and [g["name"] for g in fused.param_groups] == [g["name"] for g in plain.param_groups]
    assert fused.param_groups[0]["betas"] == (0.8, 0.9) and fused.param_groups[-1]["params"] == [extra]


def _amp_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter]) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    loss = sum((p.float() ** 2).sum() for p in params)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    # Lightning refuses to clip for optimizers that unscale internally; this one lets the scaler unscale first.
    MixedPrecision("16-mixed", "cpu", scaler).clip_gradients(optimizer, 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


def test_prefer_fused_works_with_the_grad_scaler_clipping_and_a_foreach_checkpoint() -> None:
    groups = _fresh_groups()
    plain = torch.optim.AdamW(groups())
    params = [p for g in plain.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    _amp_step(plain, torch.amp.GradScaler("cpu", init_scale=1024.0), params)
    after_plain = [p.detach().clone() for p in params]
    saved = plain.state_dict()  # a foreach checkpoint: its groups say fused=None
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    fused = prefer_fused(torch.optim.AdamW(groups()), devices=("cpu",))
    _amp_step(fused, torch.amp.GradScaler("cpu", init_scale=1024.0), params)
    for a, b in zip(after_plain, params, strict=True):
        torch.testing.assert_close(a, b)
    fused.load_state_dict(saved)
    assert all(g["fused"] for g in fused.param_groups)  # resuming that checkpoint keeps the fused kernel
    _amp_step(fused, torch.amp.GradScaler("cpu"), params)  # and steps under the scaler
