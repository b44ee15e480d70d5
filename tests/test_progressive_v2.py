"""ProgressiveUnfreezing, second generation: metric-driven phases, restore-best, per-phase learning rates and
schedule restarts, the depth cap, the printed phase table and the YAML dump, on a tiny real backbone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TinyBackbone
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_progressive import BLOCKS, GateRecorder, loader, trainer
from test_resume import assert_equal_nested

from transfer_lit import ProgressiveUnfreezing, TransferModule
from transfer_lit.callbacks.phases import Phase
from transfer_lit.schedulers import OneCycleLR, WarmupDecay

pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted(TransferModule):
    """Logs ``score = script[epoch]`` after each validation run: a metric whose course the test chooses."""

    def __init__(self, script: list[float], **kwargs: Any) -> None:
        torch.manual_seed(0)
        kwargs = {"mode": "progressive", "lr": 0.05, "backbone_lr_mult": 0.1, **kwargs}
        super().__init__(TinyBackbone(), num_classes=3, **kwargs)
        self.script = script

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("score", self.script[self.current_epoch])


class Timeline(Callback):
    """Per epoch: the frozen blocks (after the callback's epoch-start hook), the weights then and after validation."""

    def __init__(self) -> None:
        self.frozen: list[set[str]] = []
        self.at_start: list[dict[str, torch.Tensor]] = []
        self.after_val: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.frozen.append(set(pl_module.frozen_blocks))
        self.at_start.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.after_val[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def fit(model: TransferModule, callback: ProgressiveUnfreezing, epochs: int, *extra: Callback,
        **kwargs: Any) -> Trainer:
    ckpt = kwargs.pop("ckpt", None)
    run = Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[callback, *extra], logger=False,
                  num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra), **kwargs)
    run.fit(model, loader(), loader(n=16, seed=1), ckpt_path=ckpt)
    return run


# ---------------------------------------------------------------------------------------------- metric-driven


SCRIPT = [0.5, 0.4, 0.6, 0.7, 0.65, 0.6, 0.9, 0.9]  # higher is better


def metric_callback(**kwargs: Any) -> ProgressiveUnfreezing:
    kwargs = {"schedule": {2: "block2", 4: "block1"}, "monitor": "score", "monitor_mode": "max", **kwargs}
    return ProgressiveUnfreezing(**kwargs)


def test_a_phase_ends_when_the_metric_stops_improving_or_at_its_length_and_the_last_one_ends_training() -> None:
    timeline, callback = Timeline(), metric_callback()
    run = fit(Scripted(SCRIPT), callback, 8, timeline)
    # epoch 0: best 0.5; epoch 1: 0.4, no improvement -> phase 1 at epoch 2 (its key); epochs 2, 3 improve, but
    # phase 1 is 2 epochs long (keys 2 -> 4) -> phase 2 at epoch 4; 0.65 then 0.6: patience 1 -> stop after epoch 5.
    assert callback.starts == [2, 4]
    assert timeline.frozen == [set(BLOCKS)] * 2 + [{"stem", "block1"}] * 2 + [{"stem"}] * 2
    assert run.current_epoch == 6 and run.should_stop  # stopped by the rule, not at max_epochs=8


def test_the_metric_moves_later_phases_earlier() -> None:
    callback = metric_callback(schedule={3: "block2", 6: "block1"}, patience=1)
    fit(Scripted([0.5, 0.4, 0.6, 0.5, 0.7, 0.8, 0.9, 1.0]), callback, 8)
    # phase 0 ends at epoch 1's drop (start 2); phase 1 at epoch 3's drop (start 4), 2 epochs before its key
    assert callback.starts == [2, 4]


def test_patience_counts_validation_runs_without_improvement() -> None:
    callback = metric_callback(schedule={5: "block2"}, patience=2, min_delta=0.05)
    fit(Scripted([0.5, 0.52, 0.53, 0.7, 0.7, 0.7]), callback, 6)
    assert callback.starts == [3]  # 0.52 and 0.53 are within min_delta of 0.5: two runs without improvement


def test_restore_best_reloads_the_best_weights_of_the_phase_that_ended() -> None:
    timeline, callback = Timeline(), metric_callback(restore_best=True)
    fit(Scripted(SCRIPT), callback, 8, timeline)
    assert callback.starts == [2, 4]
    assert_equal_nested(timeline.at_start[2], timeline.after_val[0], "phase 0's best (epoch 0)")
    assert_equal_nested(timeline.at_start[4], timeline.after_val[3], "phase 1's best (epoch 3)")
    latest = timeline.after_val[1]  # what epoch 1 trained, which the restore threw away
    assert any(not torch.equal(latest[k], v) for k, v in timeline.at_start[2].items() if k.startswith("head."))


def test_a_missing_monitor_fails_naming_it_and_the_logged_metrics() -> None:
    with pytest.raises(ValueError, match=r"monitor='val_f2' is not a logged metric; logged: \[.*'val_loss'"):
        fit(Scripted(SCRIPT), metric_callback(monitor="val_f2"), 2)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"restore_best": True}, "`restore_best` and `last_phase_epochs` go with a metric-driven schedule"),
    ({"monitor": "x", "patience": 0}, "patience must be >= 1, got 0"),
    ({"monitor": "x", "monitor_mode": "up"}, "monitor_mode must be 'min' or 'max', got 'up'"),
    ({"schedule": {1: {"blocks": "block2", "lr": 0.1}}}, r"schedule\[1\]: a phase mapping takes the keys"),
    ({"schedule": {1: {"blocks": "block2", "lr_scale": -1}}}, r"schedule\[1\].lr_scale must be a positive number"),
])
def test_bad_options_fail_at_construction(kwargs: dict, expected: str) -> None:
    kwargs = {"schedule": {1: "block2"}, **kwargs}
    with pytest.raises(ValueError, match=expected):
        ProgressiveUnfreezing(**kwargs)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_in_the_middle_of_a_metric_driven_phase_restores_it_exactly(tmp_path: Path) -> None:
    def run(root: Path, ckpt: str | None = None) -> tuple[Trainer, ProgressiveUnfreezing]:
        callback = metric_callback(restore_best=True, warmup_steps=2)
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        kwargs: dict[str, Any] = {"ckpt": ckpt} if ckpt else {}
        return fit(Scripted(SCRIPT), callback, 8, saver, deterministic=True, **kwargs), callback

    full, full_cb = run(tmp_path / "full")
    # after epoch 2: phase 1 runs, its best so far is epoch 2's (0.6), wait 0; after epoch 4: phase 2, best 0.65
    for stop_after in (2, 4):
        ckpt = next((tmp_path / "full").glob(f"epoch={stop_after}-*.ckpt"))
        saved = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items()
                     if k.startswith("ProgressiveUnfreezing"))
        assert saved["plateau"] == {"best": pytest.approx(SCRIPT[stop_after]), "wait": 0} and "best_weights" in saved
        resumed, resumed_cb = run(tmp_path / f"resumed{stop_after}", str(ckpt))
        assert resumed_cb.starts == full_cb.starts == [2, 4]
        assert resumed.current_epoch == full.current_epoch == 6
        assert_equal_nested(full.lightning_module.state_dict(), resumed.lightning_module.state_dict(), "weights")
        assert_equal_nested(full.optimizers[0].state_dict(), resumed.optimizers[0].state_dict(), "optimizer")


# ---------------------------------------------------------------------------------------------- learning rates


def lrs_of(gates: GateRecorder, group: str) -> list[float]:
    return [round(step[group][1], 8) for step in gates.steps]


def test_a_phase_lr_scale_scales_every_group_from_that_phase_on() -> None:
    gates = GateRecorder()  # 3 steps per epoch
    schedule = {1: {"blocks": "block2", "lr_scale": 0.5}, 2: {"blocks": "block1", "lr_scale": 0.25}}
    trainer(3, [ProgressiveUnfreezing(schedule=schedule), gates]).fit(Scripted(SCRIPT), loader())
    assert lrs_of(gates, "head") == [0.05] * 3 + [0.025] * 3 + [0.0125] * 3
    assert lrs_of(gates, "backbone.block2") == [0.0] * 3 + [0.0025] * 3 + [0.00125] * 3


def warmup_decay(optimizer: torch.optim.Optimizer) -> WarmupDecay:
    return WarmupDecay(optimizer, warmup=2, decay="linear")


def test_restart_schedule_starts_the_lr_schedule_over_sized_to_the_steps_left() -> None:
    gates = GateRecorder()
    model = Scripted(SCRIPT, lr_scheduler=warmup_decay, scheduler_interval="step")
    schedule = {1: "block2", 2: {"blocks": "block1", "restart_schedule": True}}
    trainer(4, [ProgressiveUnfreezing(schedule=schedule), gates]).fit(model, loader())
    head = lrs_of(gates, "head")
    # 12 steps; warm-up 2 steps (1/3, 2/3 of the peak), then linear decay; at step 6 it starts over over 6 steps
    first = WarmupDecay(torch.optim.SGD([torch.zeros(1)], lr=0.05), warmup=2, total_steps=12)
    again = WarmupDecay(torch.optim.SGD([torch.zeros(1)], lr=0.05), warmup=2, total_steps=6)
    assert head[:6] == [round(0.05 * first.factor(s), 8) for s in range(6)]
    assert head[6:] == [round(0.05 * again.factor(s), 8) for s in range(6)]
    assert head[6] < head[7] < head[8] == 0.05  # the restarted schedule's warm-up, back to the peak


def test_restart_and_lr_scale_resume_exactly(tmp_path: Path) -> None:
    schedule = {1: "block2", 2: {"blocks": "all", "lr_scale": 0.5, "restart_schedule": True}}

    def run(root: Path, ckpt: str | None = None) -> Trainer:
        model = Scripted(SCRIPT, lr_scheduler=warmup_decay, scheduler_interval="step")
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        kwargs: dict[str, Any] = {"ckpt": ckpt} if ckpt else {}
        return fit(model, ProgressiveUnfreezing(schedule=schedule), 4, saver, deterministic=True, **kwargs)

    full = run(tmp_path / "full")
    for stop_after in (1, 2):  # the checkpoint before the restart, and the one after it
        resumed = run(tmp_path / f"r{stop_after}", str(next((tmp_path / "full").glob(f"epoch={stop_after}-*.ckpt"))))
        assert_equal_nested(full.lightning_module.state_dict(), resumed.lightning_module.state_dict(), "weights")
        assert_equal_nested(full.optimizers[0].state_dict(), resumed.optimizers[0].state_dict(), "optimizer")
        sched = [t.lr_scheduler_configs[0].scheduler.state_dict() for t in (full, resumed)]
        assert_equal_nested(sched[0], sched[1], "scheduler")


@pytest.mark.parametrize(("scheduler", "expected"), [
    (None, r"schedule\[2\].restart_schedule needs a learning-rate schedule to restart"),
    (lambda opt: OneCycleLR(opt, total_steps=12), r"schedule\[2\].restart_schedule: OneCycleLR has a fixed"),
])
def test_restart_schedule_refuses_what_it_cannot_restart(scheduler: Any, expected: str) -> None:
    model = Scripted(SCRIPT, lr_scheduler=scheduler, scheduler_interval="step")
    callback = ProgressiveUnfreezing(schedule={1: "block2", 2: {"blocks": "block1", "restart_schedule": True}})
    with pytest.raises(ValueError, match=expected):
        trainer(3, [callback]).fit(model, loader())


# ---------------------------------------------------------------------------------------------- schedules


def test_a_depth_cap_works_with_an_explicit_schedule() -> None:
    assert ProgressiveUnfreezing(schedule={1: "block2", 2: "all"}, num_blocks=2).resolve_phases(BLOCKS) == [
        Phase(1, ["block2"]), Phase(2, ["block1"])]
    with pytest.raises(ValueError, match=r"schedule\[2\]: block 'stem' is deeper than the depth cap num_blocks=2 "
                                         r"allows; it may thaw \['block1', 'block2'\]"):
        ProgressiveUnfreezing(schedule={1: "block2", 2: ["stem"]}, num_blocks=2).resolve_phases(BLOCKS)


def test_the_resolved_phase_table_is_printed_at_start(caplog: pytest.LogCaptureFixture) -> None:
    callback = ProgressiveUnfreezing(schedule={1: "block2", 3: {"blocks": "all", "lr_scale": 0.5}})
    with caplog.at_level(logging.INFO):
        trainer(1, [callback]).fit(Scripted(SCRIPT), loader())
    text = next(r.getMessage() for r in caplog.records if "phase 0, epoch-driven" in r.getMessage())
    lines = text.splitlines()
    assert lines[1].split() == ["phase", "starts", "thaws", "lr", "trainable"]
    assert lines[2].startswith("0") and "nothing (head only)" in lines[2]
    assert "epoch 3" in lines[4] and "stem, block1" in lines[4] and "x0.5" in lines[4] and "(100.0%)" in lines[4]


def test_the_schedule_yaml_feeds_back_into_the_same_phases() -> None:
    callback = metric_callback(schedule={1: "block2", 3: {"blocks": "all", "lr_scale": 0.5, "restart_schedule": True}},
                               restore_best=True)
    callback.phases = callback.resolve_phases(BLOCKS)
    spec = yaml.safe_load(callback.schedule_yaml())["trainer"]["callbacks"][0]
    assert spec["class_path"] == "transfer_lit.ProgressiveUnfreezing"
    again = ProgressiveUnfreezing(**spec["init_args"])
    assert again.resolve_phases(BLOCKS) == callback.phases == [
        Phase(1, ["block2"]), Phase(3, ["stem", "block1"], 0.5, True)]
    assert spec["init_args"]["monitor"] == "score" and spec["init_args"]["restore_best"] is True


# ---------------------------------------------------------------------------------------------- fine_tune


def test_fine_tune_trains_the_head_then_everything_at_half_the_lr_on_a_restarted_schedule() -> None:
    from transfer_lit import fine_tune

    gates, timeline = GateRecorder(), Timeline()
    model = Scripted(SCRIPT)
    run = fine_tune(model, epochs=2, freeze_epochs=1, train_dataloaders=loader(), callbacks=[gates, timeline],
                    accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert run.max_epochs == 3 and timeline.frozen == [set(BLOCKS), set(), set()]
    head = lrs_of(gates, "head")  # 3 steps per epoch: 9 steps, then 6 after the thaw, each with 30% warm-up
    first = WarmupDecay(torch.optim.SGD([torch.zeros(1)], lr=0.05), warmup=0.3, decay="cosine", total_steps=9)
    again = WarmupDecay(torch.optim.SGD([torch.zeros(1)], lr=0.025), warmup=0.3, decay="cosine", total_steps=6)
    assert head == [round(0.05 * first.factor(s), 8) for s in range(3)] + [
        round(0.025 * again.factor(s), 8) for s in range(6)]
    with pytest.raises(ValueError, match="fine_tune needs a TransferModule with mode='progressive'"):
        fine_tune(Scripted(SCRIPT, mode="finetune"), epochs=1, train_dataloaders=loader())


# ---------------------------------------------------------------------------------------------- inside an epoch


def test_fractional_epochs_thaw_inside_an_epoch_and_resume_exactly(tmp_path: Path) -> None:
    # 4 optimizer steps per epoch: 0.5 = step 2, 1.5 = step 6; ULMFiT's one block per epoch in a short budget.
    def run(root: Path, ckpt: str | None = None) -> tuple[Trainer, GateRecorder]:
        gates = GateRecorder()
        callback = ProgressiveUnfreezing(schedule={0.5: "block2", 1.5: "block1"}, warmup_steps=2)
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        run = Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, deterministic=True, callbacks=[callback, gates, saver])
        run.fit(Scripted(SCRIPT), loader(n=32), ckpt_path=ckpt)
        return run, gates

    full, gates = run(tmp_path / "full")
    assert [s["backbone.block2"][0] for s in gates.steps] == [0, 0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [s["backbone.block1"][0] for s in gates.steps] == [0] * 6 + [0.5] + [1] * 5
    resumed, again = run(tmp_path / "resumed", str(next((tmp_path / "full").glob("epoch=0-*.ckpt"))))
    assert [s["backbone.block2"][0] for s in again.steps] == [1] * 8  # not frozen again at the epoch start
    assert_equal_nested(full.lightning_module.state_dict(), resumed.lightning_module.state_dict(), "weights")


def test_every_n_epochs_may_be_a_fraction_but_not_with_a_metric() -> None:
    assert ProgressiveUnfreezing(every_n_epochs=0.5, start_epoch=1).resolve_phases(BLOCKS) == [
        Phase(1, ["block2"]), Phase(1.5, ["block1"]), Phase(2, ["stem"])]
    with pytest.raises(ValueError, match=r"fractional epochs \[0.5\] go with an epoch-driven schedule"):
        fit(Scripted(SCRIPT), metric_callback(schedule={0.5: "block2"}), 1)


# ---------------------------------------------------------------------------------------------- parameter level


BN2 = r"re:block2\.1\..*"  # block2's BatchNorm weight and bias


def test_a_regex_entry_thaws_only_the_parameters_it_matches_at_its_blocks_rate(tmp_path: Path) -> None:
    timeline, gates = Timeline(), GateRecorder()
    callback = ProgressiveUnfreezing(schedule={1: BN2, 2: "block2"})
    model = Scripted(SCRIPT)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(model, callback, 3, timeline, gates, saver)
    assert model.backbone.block_names() == ["stem", "block1", "block2", BN2]
    assert callback.phases == [Phase(1, [BN2]), Phase(2, ["block2"])]
    start = timeline.at_start

    def moved(epoch: int, key: str) -> bool:
        return not torch.equal(start[epoch][key], start[epoch + 1][key])

    assert moved(1, "backbone.block2.1.weight") and not moved(1, "backbone.block2.0.weight")  # epoch 1: the BN only
    head = next(k for k in start[0] if k.startswith("head.") and k.endswith("weight"))
    assert moved(0, head) and not moved(0, "backbone.block2.1.weight")
    assert timeline.frozen[1] == {"stem", "block1", "block2"} and timeline.frozen[2] == {"stem", "block1"}
    step = gates.steps[-1]
    assert step[f"backbone.{BN2}.no_decay"][1] == step["backbone.block2"][1] == pytest.approx(0.005)
    # predict / test from the checkpoint, without the schedule: the carved block comes back by its name
    fresh = Scripted(SCRIPT, mode="finetune")
    fresh.on_load_checkpoint(torch.load(next(tmp_path.glob("epoch=1-*.ckpt")), weights_only=False))
    assert fresh.frozen_blocks == {"stem", "block1", "block2"} and BN2 in fresh.backbone.block_names()


@pytest.mark.parametrize(("entry", "expected"), [
    (r"re:block3\..*", r"schedule\[1\]: 're:block3\\\\..\*': regex 'block3\\\\..\*' matches no parameter of "
                       r"TinyBackbone; parameter names look like \['stem.0.weight'"),
    (r"re:block2\..*", r"take every parameter of block 'block2'; name the block instead"),
    (r"re:block2\.(", r"schedule\[1\]: 're:block2\\\\.\(': missing \), unterminated subpattern"),
])
def test_a_bad_regex_entry_fails_before_training_naming_the_key(entry: str, expected: str) -> None:
    model = Scripted(SCRIPT)
    with pytest.raises(ValueError, match=expected):
        fit(model, ProgressiveUnfreezing(schedule={1: entry}), 1)
    assert model.backbone.block_names() == BLOCKS  # a failed carve leaves the backbone as it was


def test_the_readme_schedule_example_resolves_against_mobilenet_v2() -> None:
    from transfer_lit import TorchvisionBackbone

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("- class_path: transfer_lit.ProgressiveUnfreezing\n  init_args:"):]
    spec = yaml.safe_load(block[: block.index("```")])[0]
    callback = ProgressiveUnfreezing(**spec["init_args"])
    model = TransferModule(TorchvisionBackbone("mobilenet_v2", None), num_classes=2, mode="progressive")
    table = callback.plan(model)
    assert "metric-driven" in table and len(callback.phases) == 3
    assert callback.phases[2].lr_scale == 0.5 and callback.phases[2].restart_schedule
    assert len(callback.phases[2].blocks) == 6  # the depth cap of 8, less the two thawed before
