"""Any torch LR scheduler, chosen in YAML through the CLI, composes with progressive unfreezing.

Inside every ``optimizer.step`` each group's effective learning rate must equal
``base LR x schedule factor x gate``: the factor the same for every group (differential learning
rates kept), the gate 0 while frozen and ramping over the warm-up after the thaw.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_image_folder
from lightning.pytorch import Callback, Trainer

from transfer_lit import ImageDataModule, TransferModule
from transfer_lit.cli import TransferCLI
from transfer_lit.param_groups import build_param_groups
from transfer_lit.schedulers import LinearWarmup, OneCycleLR, WarmupDecay

STEPS_PER_EPOCH, EPOCHS, WARMUP = 3, 3, 2
THAW_STEP = {"head": -WARMUP, "backbone.block2": 3, "backbone.block1": 6, "backbone.stem": 6}

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: {epochs}
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  callbacks:
    - class_path: transfer_lit.ProgressiveUnfreezing
      init_args:
        schedule: {{1: [block2], 2: all}}
        warmup_steps: {warmup}
model:
  backbone:
    class_path: conftest.TinyBackbone
  mode: progressive
  lr: 0.05
  backbone_lr_mult: 0.1
  layer_decay: 0.5
  scheduler_interval: {interval}
  lr_scheduler:
{scheduler}
data:
  batch_size: 4
  num_workers: 0
"""

SCHEDULERS = {
    "lambda_warmup": ("step", """
    class_path: torch.optim.lr_scheduler.LambdaLR
    init_args:
      lr_lambda:
        class_path: transfer_lit.schedulers.LinearWarmup
        init_args: {warmup_steps: 4}"""),
    "one_cycle": ("step", """
    class_path: transfer_lit.schedulers.OneCycleLR
    init_args: {total_steps: 9, max_lr_factor: 2.0}"""),
    "warmup_decay": ("step", """
    class_path: transfer_lit.schedulers.WarmupDecay
    init_args: {warmup: 3}"""),  # no total_steps: sized from the trainer (9 optimizer steps)
    "cosine": ("epoch", """
    class_path: torch.optim.lr_scheduler.CosineAnnealingLR
    init_args: {T_max: 3}"""),
    "plateau": ("epoch", """
    class_path: torch.optim.lr_scheduler.ReduceLROnPlateau
    init_args: {factor: 0.5, patience: 0, threshold: 10.0}"""),  # never "improves": halves every epoch
}


pytestmark = pytest.mark.usefixtures("one_thread")


def one_cycle_factors() -> list[float]:
    """torch's own OneCycleLR on a group of LR 1 with peak 2: the factor sequence every group must follow."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2.0, total_steps=9)
    factors = []
    for _ in range(9):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def expected_factor(name: str, step: int) -> float:
    epoch = step // STEPS_PER_EPOCH
    if name == "lambda_warmup":
        return LinearWarmup(4)(step)
    if name == "one_cycle":
        return one_cycle_factors()[step]
    if name == "warmup_decay":  # 3 warm-up steps of 9, then linear to 0
        return (step + 1) / 4 if step < 3 else 1 - (step - 3) / 6
    if name == "cosine":
        return (1 + math.cos(math.pi * epoch / 3)) / 2
    return 0.5**epoch


def expected_gate(block: str, step: int) -> float:
    since = step - THAW_STEP[block]
    return 0.0 if since < 0 else min(1.0, (since + 1) / WARMUP)


class StepRecorder(Callback):
    """Per optimizer step and group: the gate and LR inside ``step`` (a pre-hook registered after the LR
    gate's) and the scheduler's LR (a post-hook after the gate restored it)."""

    def __init__(self) -> None:
        self.inside: list[dict[str, tuple[float, float]]] = []
        self.scheduled: list[dict[str, float]] = []

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(
            lambda opt, *_: self.inside.append({g["name"]: (g["lr"], g["gate"]) for g in opt.param_groups}))
        optimizer.register_step_post_hook(
            lambda opt, *_: self.scheduled.append({g["name"]: g["lr"] for g in opt.param_groups}))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), {"train": 4, "val": 2}, size=36)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_from_yaml_across_thaws(name: str, image_root: Path, tmp_path: Path) -> None:
    interval, scheduler = SCHEDULERS[name]
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(epochs=EPOCHS, warmup=WARMUP, interval=interval, scheduler=scheduler))
    cli = TransferCLI(TransferModule, ImageDataModule, run=False, save_config_callback=None,
                      args=["--config", str(config), "--data.root", str(image_root),
                            "--trainer.default_root_dir", str(tmp_path)])
    recorder = StepRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)

    model = cli.model
    base = {g["name"]: g["lr"] for g in build_param_groups(model.backbone, model.head, model.policy)}
    assert base["head"] == 0.05 and base["backbone.block2"] == pytest.approx(0.005)
    assert base["backbone.block1"] == pytest.approx(0.0025)  # layer decay: ratios between groups matter
    assert len(recorder.inside) == STEPS_PER_EPOCH * EPOCHS
    for step, (inside, scheduled) in enumerate(zip(recorder.inside, recorder.scheduled, strict=True)):
        for group, (lr, gate) in inside.items():
            block = group.removesuffix(".no_decay")
            assert gate == pytest.approx(expected_gate(block, step)), (step, group)
            assert lr == pytest.approx(scheduled[group] * gate, rel=1e-12, abs=0), (step, group)
            factor = scheduled[group] / base[group]
            assert factor == pytest.approx(expected_factor(name, step), rel=1e-9), (step, group)
    assert model.frozen_blocks == set()


def test_one_cycle_keeps_each_group_peak() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-4}])
    scheduler = OneCycleLR(optimizer, total_steps=10, max_lr_factor=3.0)
    assert [g["max_lr"] for g in optimizer.param_groups] == pytest.approx([3e-2, 3e-4])
    peaks = [0.0, 0.0]
    for _ in range(10):
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, optimizer.param_groups, strict=True)]
        optimizer.step()
        scheduler.step() if scheduler.last_epoch < 9 else None
    assert peaks == pytest.approx([3e-2, 3e-4])


def test_linear_warmup() -> None:
    assert [LinearWarmup(4)(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LinearWarmup(0)(0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        LinearWarmup(-1)


def test_warmup_decay_shapes_and_bad_values() -> None:
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    scheduler = WarmupDecay(optimizer, warmup=0.2, decay="cosine", final_factor=0.1, total_steps=10)
    factors = [scheduler.factor(s) for s in range(11)]
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3]) and factors[2] == pytest.approx(1.0)
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5) and factors[10] == pytest.approx(0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1 / 3, 0.1 / 3])  # each group its own
    unsized = WarmupDecay(optimizer, warmup=2)
    unsized.set_total_steps(4)
    assert unsized.total_steps == 4 and unsized.factor(3) == pytest.approx(0.5)
    for kwargs, pattern in (({"warmup": -1}, "warmup must be >= 0"), ({"decay": "step"}, "decay must be"),
                            ({"final_factor": 2.0}, r"final_factor must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=pattern):
            WarmupDecay(optimizer, **kwargs)  # type: ignore[arg-type]
