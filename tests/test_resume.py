"""Resuming a progressive run from a checkpoint reproduces the uninterrupted run exactly (CPU).

Lightning restores weights, optimizer, scheduler and loop state; the module restores its frozen
blocks (``requires_grad``, BatchNorm modes, LR gates) and ProgressiveUnfreezing its phase and
thaw steps. Data order is made resumable with a sampler Lightning re-seeds every epoch
(``set_epoch``), as the DistributedSampler it injects under DDP is.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from transfer_lit import ProgressiveUnfreezing, TransferModule
from transfer_lit.schedulers import LinearWarmup

EPOCHS = 5
SCHEDULE = {1: "block2", 3: ["stem", "block1"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 3, (24,), generator=g))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)  # shuffled by (seed, epoch)
    return DataLoader(data, batch_size=8, sampler=sampler)


class StateRecorder(Callback):
    """Per epoch: frozen blocks, requires_grad flags, BatchNorm modes and gates, as training saw them."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, Any]] = {}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.epochs[trainer.current_epoch] = {
            "frozen": sorted(pl_module.frozen_blocks),
            "requires_grad": {n: p.requires_grad for n, p in pl_module.named_parameters()},
            "training": {n: m.training for n, m in pl_module.named_modules()},
            "gates": [g["gate"] for g in trainer.optimizers[0].param_groups],
        }


def run(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, seed: int = 0) -> tuple[Trainer, Any]:
    seed_everything(seed)  # a resumed run's fresh init must not matter
    model = TransferModule(TinyBackbone(), num_classes=3, mode="progressive", lr=0.05, backbone_lr_mult=0.1,
                           lr_scheduler=partial(LambdaLR, lr_lambda=LinearWarmup(4)), scheduler_interval="step")
    recorder = StateRecorder()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
        callbacks=[ProgressiveUnfreezing(schedule=SCHEDULE, warmup_steps=2), recorder,
                   ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)],
    )
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, recorder


def assert_equal_nested(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, StateRecorder, Path]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    trainer, recorder = run(tmp, EPOCHS)
    return trainer, recorder, tmp


@pytest.mark.parametrize("stop_after", [0, 1, 3], ids=["before-first-thaw", "after-first-thaw", "after-last-thaw"])
def test_resume_equals_uninterrupted_run(uninterrupted: tuple, stop_after: int) -> None:
    full, full_record, tmp = uninterrupted
    checkpoint = next((tmp / "ckpt").glob(f"epoch={stop_after}-step=*.ckpt"))
    resumed, resumed_record = run(tmp / f"resumed{stop_after}", EPOCHS, ckpt_path=str(checkpoint), seed=123)

    a, b = full.lightning_module, resumed.lightning_module
    assert_equal_nested(a.state_dict(), b.state_dict(), "state_dict")  # weights and BatchNorm statistics
    assert_equal_nested(full.optimizers[0].state_dict(), resumed.optimizers[0].state_dict(), "optimizer")
    sched_a, sched_b = (t.lr_scheduler_configs[0].scheduler for t in (full, resumed))
    assert_equal_nested(sched_a.state_dict(), sched_b.state_dict(), "scheduler")
    assert sched_b.last_epoch == full.global_step == resumed.global_step == 15
    for epoch in range(stop_after + 1, EPOCHS):
        assert_equal_nested(full_record.epochs[epoch], resumed_record.epochs[epoch], f"epoch {epoch}")
    unfreezing = [next(c for c in t.callbacks if isinstance(c, ProgressiveUnfreezing)) for t in (full, resumed)]
    assert unfreezing[0].state_dict() == unfreezing[1].state_dict()
    assert unfreezing[1].thaw_steps == {"block2": 3, "stem": 9, "block1": 9}
    assert b.frozen_blocks == set()


def test_checkpoint_after_first_thaw_holds_the_phase(uninterrupted: tuple) -> None:
    _, _, tmp = uninterrupted
    checkpoint = torch.load(next((tmp / "ckpt").glob("epoch=1-step=*.ckpt")), weights_only=False)
    assert checkpoint["transfer_lit"]["frozen_blocks"] == ["block1", "stem"]
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ProgressiveUnfreezing"))
    assert state["phase"] == 1 and state["thaw_steps"] == {"block2": 3}
    gates = {g["name"]: g["gate"] for g in checkpoint["optimizer_states"][0]["param_groups"]}
    assert gates["backbone.block2"] == 1.0 and gates["backbone.block1"] == 0.0
