"""ProgressiveUnfreezing on a tiny real backbone: schedules, validation, warm-up, BatchNorm policies,
what frozen blocks cost, and readable learning-rate monitor names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import ProgressiveUnfreezing, TransferModule
from transfer_lit.callbacks.phases import Phase

BLOCKS = ["stem", "block1", "block2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def loader(n: int = 24, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def module(**kwargs: Any) -> TransferModule:
    torch.manual_seed(0)
    kwargs = {"mode": "progressive", "lr": 0.05, "backbone_lr_mult": 0.1, **kwargs}
    return TransferModule(TinyBackbone(), num_classes=3, **kwargs)


def trainer(max_epochs: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    kwargs = {"logger": False, **kwargs}
    return Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **kwargs)


class EpochRecorder(Callback):
    """What is frozen during each epoch (read after ProgressiveUnfreezing ran its epoch-start hook)."""

    def __init__(self) -> None:
        self.frozen: list[set[str]] = []
        self.trainable: list[set[str]] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.frozen.append(set(pl_module.frozen_blocks))
        blocks = pl_module.backbone.block_params()
        self.trainable.append({b for b, params in blocks.items() if all(p.requires_grad for _, p in params)})


class GateRecorder(Callback):
    """Each group's gate and effective LR inside every ``optimizer.step`` (hook registered after the LR gate)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[float, float]]] = []

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        def record(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.steps.append({g["name"]: (g["gate"], g["lr"]) for g in opt.param_groups})

        trainer.optimizers[0].register_step_pre_hook(record)


# ---------------------------------------------------------------------------------------------- schedules


def test_schedule_thaws_blocks_at_their_epochs_and_logs_each_phase(caplog: pytest.LogCaptureFixture) -> None:
    model, recorder = module(), EpochRecorder()
    callback = ProgressiveUnfreezing(schedule={1: "block2", 3: ["stem", "block1"]})
    with caplog.at_level(logging.INFO):
        trainer(4, [callback, recorder]).fit(model, loader())
    assert recorder.frozen == [set(BLOCKS), {"stem", "block1"}, {"stem", "block1"}, set()]
    assert recorder.trainable == [set(), {"block2"}, {"block2"}, set(BLOCKS)]
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ProgressiveUnfreezing: epoch")]
    total = sum(p.numel() for p in model.parameters())
    assert len(phases) == 3  # one line per phase, not per epoch
    assert "phase 1/2: thawed ['block2']" in phases[1] and f"/ {total:,}" in phases[1]
    assert f"trainable parameters {total:,} / {total:,}" in phases[2]
    assert model.trainer.callback_metrics["unfreeze_phase"] == 2
    assert model.trainer.callback_metrics["trainable_params"] == total


def test_every_n_epochs_thaws_from_the_head_side() -> None:
    assert ProgressiveUnfreezing(every_n_epochs=2).resolve_phases(BLOCKS) == [
        Phase(2, ["block2"]), Phase(4, ["block1"]), Phase(6, ["stem"])]
    assert ProgressiveUnfreezing(every_n_epochs=1, start_epoch=3, num_blocks=2).resolve_phases(BLOCKS) == [
        Phase(3, ["block2"]), Phase(4, ["block1"])]
    assert ProgressiveUnfreezing(schedule={0: "block2", 2: "all"}).resolve_phases(BLOCKS) == [
        Phase(0, ["block2"]), Phase(2, ["stem", "block1"])]


def test_warmup_ramps_the_gate_of_each_newly_thawed_block() -> None:
    gates = GateRecorder()  # 3 steps per epoch: block2 thaws at step 3, block1 at step 6
    trainer(3, [ProgressiveUnfreezing(schedule={1: "block2", 2: "block1"}, warmup_steps=2), gates]).fit(
        module(), loader())
    block2 = [s["backbone.block2"][0] for s in gates.steps]
    block1 = [s["backbone.block1.no_decay"][0] for s in gates.steps]
    assert block2 == [0, 0, 0, 0.5, 1, 1, 1, 1, 1]
    assert block1 == [0, 0, 0, 0, 0, 0, 0.5, 1, 1]
    assert all(s["head"][0] == 1 and s["backbone.stem"][0] == 0 for s in gates.steps)


def test_a_callback_reused_for_another_fit_starts_afresh() -> None:
    """A second ``fit`` (a notebook re-run) must not inherit the first run's thaw steps: block2 thawed at
    step 6 there, at step 3 here, and a stale thaw step gave a negative warm-up gate."""
    callback = ProgressiveUnfreezing(schedule={1: "block2"}, warmup_steps=2)
    trainer(2, [callback]).fit(module(), loader(n=48))
    gates = GateRecorder()
    trainer(2, [callback, gates]).fit(module(), loader(n=24))
    assert [s["backbone.block2"][0] for s in gates.steps] == [0, 0, 0, 0.5, 1, 1]
    assert callback.thaw_steps == {"block2": 3}


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"schedule": {1: ["block2"], 2: ["layer4"]}},
         ["schedule[2]", "unknown block 'layer4'", "['stem', 'block1', 'block2']"]),
        ({"schedule": {1: "block2", 2: ["block1", "block2"]}},
         ["schedule[2]", "'block2' is thawed twice", "already at epoch 1"]),
        ({"schedule": {1: "all", 3: "all"}}, ["schedule[3]='all' thaws nothing", "past the last block"]),
        ({"schedule": {1: []}}, ["schedule[1] is empty", "'block2'"]),
        ({"every_n_epochs": 1, "num_blocks": 4}, ["num_blocks=4", "only 3 blocks", "'stem'"]),
    ],
)
def test_invalid_schedules_fail_before_training_naming_key_value_and_valid_blocks(kwargs: dict,
                                                                                  expected: list[str]) -> None:
    model = module()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit = trainer(5, [ProgressiveUnfreezing(**kwargs)])
    with pytest.raises(ValueError) as error:
        fit.fit(model, loader())
    for text in expected:
        assert text in str(error.value)
    assert fit.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"schedule": {3: "block2", 1: "block1"}}, "strictly increasing in the order given, got [3, 1]"),
        ({"schedule": {-1: "block2"}}, "numbers >= 0 (1.5 = halfway through epoch 1), got -1"),
        ({"schedule": {1: "block2"}, "every_n_epochs": 1}, "exactly one of"),
        ({}, "exactly one of"),
        ({"every_n_epochs": 0}, "every_n_epochs must be > 0 (0.5 = every half epoch), got 0"),
        ({"every_n_epochs": 1, "warmup_steps": -2}, "warmup_steps must be >= 0, got -2"),
        ({"schedule": {1: 5}}, "schedule[1] must be a block name"),
    ],
)
def test_malformed_schedules_fail_at_construction(kwargs: dict, expected: str) -> None:
    with pytest.raises(ValueError) as error:
        ProgressiveUnfreezing(**kwargs)
    assert expected in str(error.value)


@pytest.mark.parametrize("mode", ["finetune", "linear_probe"])
def test_needs_progressive_mode(mode: str) -> None:
    with pytest.raises(ValueError, match=f"needs model.mode='progressive', got model.mode='{mode}'"):
        trainer(2, [ProgressiveUnfreezing(every_n_epochs=1)]).fit(module(mode=mode), loader())


def test_phase_past_max_epochs_warns() -> None:
    with pytest.warns(UserWarning, match=r"epoch\(s\) \[4\] never start with trainer.max_epochs=2"):
        trainer(2, [ProgressiveUnfreezing(schedule={1: "block2", 4: "block1"})]).fit(module(), loader())


# ---------------------------------------------------------------------------------------------- cost and BN


def test_frozen_blocks_have_no_gradient_and_no_optimizer_state() -> None:
    model = module()
    fit = trainer(2, [ProgressiveUnfreezing(schedule={1: "block2"})])
    fit.fit(model, loader())
    state = fit.optimizers[0].state
    blocks = model.backbone.block_params()
    for block in ("stem", "block1"):
        for name, p in blocks[block]:
            assert not p.requires_grad and p.grad is None, name
            assert p not in state, name
    for _, p in blocks["block2"]:
        assert p in state and int(state[p]["step"]) == 3  # thawed for the 3 steps of epoch 1
    assert all(int(state[p]["step"]) == 6 for p in model.head.parameters())


def _bn_stats(model: TransferModule, block: str) -> list[torch.Tensor]:
    return [t.clone() for m in model.backbone.block_modules(block) if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("bn_policy", ["eval", "frozen", "train"])
def test_bn_policy_of_frozen_blocks(bn_policy: str) -> None:
    model = module(bn_policy=bn_policy)
    before = {b: _bn_stats(model, b) for b in BLOCKS}
    affine = [t.detach().clone() for t in model.backbone.block2[1].parameters()]
    trainer(2, [ProgressiveUnfreezing(schedule={1: "block2"})]).fit(model, loader())
    assert model.frozen_blocks == {"stem", "block1"}
    x = loader().dataset.tensors[0][:8]

    def stem_output(training: bool) -> torch.Tensor:
        model.train(training)
        with torch.no_grad():
            return model.backbone.stem(x)

    frozen_unchanged = all(torch.equal(a, b) for a, b in zip(before["stem"], _bn_stats(model, "stem"), strict=True))
    if bn_policy == "train":
        assert not frozen_unchanged  # batch statistics, running stats updated
        assert not torch.equal(stem_output(True), stem_output(False))
    else:
        assert frozen_unchanged
        assert all(torch.equal(a, b) for a, b in zip(before["block1"], _bn_stats(model, "block1"), strict=True))
        assert torch.equal(stem_output(True), stem_output(False))
    model.train()
    assert model.backbone.stem[1].training is (bn_policy == "train")
    assert model.backbone.block2[1].training is (bn_policy != "frozen")  # thawed block
    bn2 = model.backbone.block2[1]
    affine_unchanged = all(torch.equal(a, b) for a, b in zip(affine, bn2.parameters(), strict=True))
    assert affine_unchanged is (bn_policy == "frozen")  # 'frozen' never trains BatchNorm, even once thawed


# ---------------------------------------------------------------------------------------------- monitor


def test_learning_rate_monitor_uses_group_names(tmp_path: Path) -> None:
    monitor = LearningRateMonitor(logging_interval="epoch")
    logger = CSVLogger(tmp_path, name="run")
    trainer(2, [ProgressiveUnfreezing(schedule={1: "block2"}), monitor], logger=logger).fit(module(), loader())
    names = {f"lr-AdamW/{g}" for b in ["backbone.stem", "backbone.block1", "backbone.block2", "head"]
             for g in (b, f"{b}.no_decay")}
    assert set(monitor.lrs) == names
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-AdamW/head", "lr-AdamW/backbone.block2", "unfreeze_phase", "trainable_params"} <= set(header)
    assert monitor.lrs["lr-AdamW/head"] == [0.05, 0.05]
    assert monitor.lrs["lr-AdamW/backbone.block2"] == pytest.approx([0.005, 0.005])


def test_train_bn_trains_the_batchnorm_of_frozen_blocks_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    # Lightning's and fastai's train_bn=True: BatchNorm affine parameters of frozen blocks train (batch statistics
    # too); the rest of a frozen block does not move.
    model = module(bn_policy="train_bn")
    stem_conv = [t.detach().clone() for t in model.backbone.stem[0].parameters()]
    stem_bn = [t.detach().clone() for t in model.backbone.stem[1].parameters()]
    running = model.backbone.stem[1].running_mean.clone()
    with caplog.at_level(logging.INFO):
        trainer(2, [ProgressiveUnfreezing(schedule={1: "block2"})]).fit(model, loader())
    assert model.frozen_blocks == {"stem", "block1"}
    assert all(torch.equal(a, b) for a, b in zip(stem_conv, model.backbone.stem[0].parameters(), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(stem_bn, model.backbone.stem[1].parameters(), strict=True))
    assert not torch.equal(running, model.backbone.stem[1].running_mean)
    model.train()
    assert model.backbone.stem[1].training
    groups = {g["name"]: g for g in model.trainer.optimizers[0].param_groups}
    assert groups["backbone.stem.bn"]["gate"] == 1.0 and groups["backbone.stem"]["gate"] == 0.0
    # trainable count of phase 0: the head plus every BatchNorm's weight and bias (8 + 8 + 16 channels, x2)
    head = sum(p.numel() for p in model.head.parameters())
    assert f"trainable parameters {head + 2 * (8 + 8 + 16):,} /" in caplog.text


def test_train_bn_is_refused_for_a_linear_probe() -> None:
    with pytest.raises(ValueError, match=r"model.bn_policy='train_bn'.*model.mode='linear_probe'"):
        module(mode="linear_probe", bn_policy="train_bn")


# ---------------------------------------------------------------------------------------------- one optimizer


class TwoOptimizers(TransferModule):
    """Manual optimization with a second, ungated optimizer over the backbone (`two`: beside the gated one)."""

    def __init__(self, two: bool = True, **kwargs: Any) -> None:
        super().__init__(TinyBackbone(), num_classes=3, mode="progressive", **kwargs)
        self.automatic_optimization = False
        self.two = two

    def configure_optimizers(self) -> Any:
        first = super().configure_optimizers()
        extra = torch.optim.SGD(self.backbone.parameters(), lr=0.1)
        return [first, extra] if self.two else extra

    def training_step(self, batch: Any, batch_idx: int) -> None:
        loss = self.loss(self.batch_logits(batch), batch[1])
        self.manual_backward(loss)
        for opt in self.optimizers() if isinstance(self.optimizers(), list) else [self.optimizers()]:
            opt.step()


@pytest.mark.parametrize(("two", "expected"), [
    (True, r"configure_optimizers returned 2 optimizers \['AdamW', 'SGD'\]; transfer_lit trains with one"),
    (False, r"configure_optimizers returned a SGD without transfer_lit's LR gates"),
])
def test_a_second_or_ungated_optimizer_is_refused_before_any_step(two: bool, expected: str) -> None:
    model = TwoOptimizers(two=two)
    before = [t.detach().clone() for t in model.backbone.parameters()]
    with pytest.raises(ValueError, match=expected):
        trainer(1, [ProgressiveUnfreezing(schedule={1: "block2"})]).fit(model, loader())
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters(), strict=True))
