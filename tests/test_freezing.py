"""Freezing strategies: chosen once from the trainer's strategy, each owning what freezing means under it.

The gate-only path (FSDP, DeepSpeed) is run here on CPU in one process by injecting its strategy object
through ``TransferModule.configure_freezing``: it must train exactly the weights the one-device path trains,
which it only does when frozen gradients are held before clipping and a thawed block's optimizer state
restarts (each of the two, made a no-op, breaks the equality).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import (
    DDPFreezing,
    DeepSpeedFreezing,
    FreezingStrategy,
    GateOnlyFreezing,
    ProgressiveUnfreezing,
    TransferModule,
)
from transfer_lit.freezing import build_freezing, install_lr_gate


def _bare(cls: type) -> object:
    return cls.__new__(cls)  # the type is all build_freezing looks at (DeepSpeed / FSDP need GPUs to construct)


@pytest.mark.parametrize(
    ("strategy", "world_size", "expected"),
    [
        (SingleDeviceStrategy, 1, FreezingStrategy),
        (DDPStrategy, 1, FreezingStrategy),  # one process: nothing to sync
        (DDPStrategy, 2, DDPFreezing),
        (FSDPStrategy, 2, GateOnlyFreezing),
        (DeepSpeedStrategy, 2, DeepSpeedFreezing),  # a DDPStrategy subclass, but sharded
    ],
)
def test_the_strategy_is_chosen_from_the_trainer_strategy(strategy: type, world_size: int, expected: type) -> None:
    assert type(build_freezing(_bare(strategy), world_size)) is expected  # type: ignore[arg-type]


def test_deepspeed_refuses_progressive_and_sharded_strategies_say_so() -> None:
    with pytest.raises(ValueError, match=r"model\.mode='progressive' is not supported with DeepSpeed"):
        DeepSpeedFreezing().check_mode("progressive")
    DeepSpeedFreezing().check_mode("finetune")
    assert GateOnlyFreezing.shards_parameters and DeepSpeedFreezing.shards_parameters
    assert not FreezingStrategy.shards_parameters and not DDPFreezing.shards_parameters


def _gated_adam(gate: float) -> tuple[torch.optim.Optimizer, torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([{"params": [p], "gate": gate, "block": "backbone.x", "name": "backbone.x"}])
    install_lr_gate(optimizer, lambda: 1.0)
    p.grad = torch.ones(3)
    return optimizer, p


def test_hold_is_the_one_place_frozen_gradients_are_dropped() -> None:
    backbone = TinyBackbone()
    optimizer, p = _gated_adam(0.0)
    FreezingStrategy().hold(optimizer, backbone, "eval")
    assert p.grad is None  # one device: dropped, so the optimizer keeps no state for it
    optimizer.step()
    assert p not in optimizer.state
    optimizer, p = _gated_adam(0.0)
    GateOnlyFreezing().hold(optimizer, backbone, "eval")
    assert p.grad is not None and torch.equal(p.grad, torch.zeros(3))  # sharded: zeroed, state kept
    optimizer, p = _gated_adam(0.5)
    FreezingStrategy().hold(optimizer, backbone, "eval")
    assert torch.equal(p.grad, torch.ones(3))  # a warming block (gate > 0) trains
    optimizer, p = _gated_adam(0.0)
    optimizer.step()  # without the hold the gate alone only zeroes the LR: Adam still builds state
    assert p in optimizer.state and torch.equal(p.detach(), torch.ones(3))


class _GateOnly(TransferModule):
    """The FSDP path on CPU: the strategy object is injected."""

    def configure_freezing(self) -> FreezingStrategy:
        return GateOnlyFreezing()


class _StateAtEpochEnd(ProgressiveUnfreezing):
    """Records, at the end of epoch 0 (block2 still frozen), the largest Adam moment of block2's weights."""

    moments: float | None = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: TransferModule) -> None:  # type: ignore[override]
        if trainer.current_epoch == 0:
            state = trainer.optimizers[0].state.get(pl_module.backbone.block2[0].weight, {})
            self.moments = max((float(v.abs().max()) for k, v in state.items() if k != "step"), default=0.0)


def _fit_progressive(cls: type[TransferModule], root: Path) -> tuple[TransferModule, _StateAtEpochEnd]:
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 3, (32,), generator=g))
    model = cls(TinyBackbone(), num_classes=3, mode="progressive", lr=0.05, backbone_lr_mult=0.5)
    callback = _StateAtEpochEnd(schedule={1: "block2"}, warmup_steps=2)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                      gradient_clip_val=0.05, default_root_dir=root)  # clipping on every step: the norm must
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))  # not see frozen gradients
    return model, callback


def test_gate_only_freezing_trains_the_same_weights_as_requires_grad_freezing(tmp_path: Path, one_thread: None) -> None:
    reference, _ = _fit_progressive(TransferModule, tmp_path / "a")
    gate_only, seen = _fit_progressive(_GateOnly, tmp_path / "b")
    assert type(gate_only.freezing) is GateOnlyFreezing and type(reference.freezing) is FreezingStrategy
    assert all(p.requires_grad for p in gate_only.backbone.parameters())  # frozen by the gate alone
    assert seen.moments == 0.0  # the held (zeroed) gradients left no moments while block2 was frozen
    ours, theirs = gate_only.state_dict(), reference.state_dict()
    assert not torch.equal(ours["backbone.block2.0.weight"], _fit_init()["backbone.block2.0.weight"])  # it trained
    for name, value in theirs.items():
        assert torch.allclose(ours[name], value, atol=1e-6, rtol=0), name
    assert torch.equal(ours["backbone.stem.0.weight"], _fit_init()["backbone.stem.0.weight"])  # never thawed


def _fit_init() -> dict[str, torch.Tensor]:
    seed_everything(0)
    return TransferModule(TinyBackbone(), num_classes=3, mode="progressive").state_dict()


def test_a_block_that_changes_state_and_a_new_optimizer_start_without_an_old_warm_up() -> None:
    model = TransferModule(TinyBackbone(), num_classes=3, mode="progressive")
    optimizer = model.configure_optimizers()
    model.set_frozen_blocks(["stem", "block1"])  # block2 thawed
    model.frozen.set_gates({"block2": 0.5}, optimizer)
    gates = {g["name"]: g["gate"] for g in optimizer.param_groups}
    assert gates["backbone.block2"] == 0.5 and gates["backbone.block1"] == 0.0
    model.frozen.freeze_exactly(["stem", "block1", "block2"], optimizer)
    model.frozen.freeze_exactly(["stem", "block1"], optimizer)  # thawed again: a new warm-up, not the old 0.5
    assert {g["name"]: g["gate"] for g in optimizer.param_groups}["backbone.block2"] == 1.0
    model.frozen.set_gates({"block2": 0.25}, optimizer)
    fresh = model.configure_optimizers()  # a new fit's optimizer: no gate carried over
    assert {g["name"]: g["gate"] for g in fresh.param_groups}["backbone.block2"] == 1.0


def test_blocks_frozen_after_ddp_took_its_list_are_refused() -> None:
    model = TransferModule(TinyBackbone(), num_classes=3, mode="progressive")
    model.set_frozen_blocks(["stem"])
    ddp = DDPFreezing()
    ddp.before_wrap(model)
    assert model._ddp_params_and_buffers_to_ignore == [n for n, _ in model.named_parameters()
                                                       if n.startswith("backbone.stem.")]
    ddp.on_fit_start(model)  # nothing frozen since: fine (no process group here: no broadcast)
    model.set_frozen_blocks(["stem", "block1"])
    with pytest.raises(ValueError, match=r"backbone\.block1\.0\.weight.*frozen after DDP wrapped the model"):
        ddp.on_fit_start(model)


class _DropsCallbacks(TransferModule):
    def configure_callbacks(self) -> list:
        return []


def test_a_subclass_that_drops_the_freezing_hooks_is_stopped(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)))
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"_DropsCallbacks\.configure_callbacks dropped FreezingHooks"):
        trainer.fit(_DropsCallbacks(TinyBackbone(), num_classes=3), DataLoader(data, batch_size=4))
