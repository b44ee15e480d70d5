"""LRFinder sweeps one global multiplier (``lr_scale``): the ratios between groups survive, and
training starts from exactly the state it would have started from without the sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset, default_collate

from transfer_lit import ImageDataModule, LRFinder, TransferModule
from transfer_lit.cli import TransferCLI

pytestmark = pytest.mark.usefixtures("one_thread")


class Probe(Callback):
    """The state training starts from, and each group's effective LR inside every ``optimizer.step``."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.optimizer_state_at_start: int = -1
        self.effective: list[dict[str, float]] = []

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optimizer_state_at_start = len(trainer.optimizers[0].state)
        trainer.optimizers[0].register_step_pre_hook(
            lambda opt, *_: self.effective.append({g["name"]: g["lr"] for g in opt.param_groups}))


def fit(finder: LRFinder | None, lr_scale: float = 1.0, mode: str = "finetune") -> tuple[TransferModule, Probe]:
    seed_everything(0)
    model = TransferModule(TinyBackbone(), num_classes=3, mode=mode, lr=0.01, backbone_lr_mult=0.1)
    model.lr_scale = lr_scale
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 3, (32,), generator=g))
    probe = Probe()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[c for c in (finder, probe) if c is not None])
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    return model, probe


@pytest.fixture(scope="module")
def swept() -> tuple[TransferModule, Probe, LRFinder, dict[str, torch.Tensor]]:
    seed_everything(0)
    initial = TransferModule(TinyBackbone(), num_classes=3, lr=0.01, backbone_lr_mult=0.1).state_dict()
    finder = LRFinder(min_scale=0.01, max_scale=100, num_steps=24)
    model, probe = fit(finder)
    return model, probe, finder, initial


def test_suggestion_scales_every_group_and_keeps_the_ratios(swept: tuple) -> None:
    model, probe, finder, _ = swept
    assert finder.suggestion is not None and model.lr_scale == finder.suggestion != 1.0
    assert 0.01 <= finder.suggestion <= 100
    for lrs in probe.effective:
        assert lrs["head"] == pytest.approx(0.01 * finder.suggestion, rel=1e-12)
        for name in ("backbone.block2", "backbone.stem.no_decay", "head.no_decay"):
            ratio = 1.0 if name.startswith("head") else 0.1
            assert lrs[name] / lrs["head"] == pytest.approx(ratio, rel=1e-12)


def test_training_starts_from_the_untouched_state(swept: tuple) -> None:
    _, probe, finder, initial = swept
    assert len(finder.losses) >= 3
    assert all(torch.equal(initial[k], probe.start[k]) for k in initial)  # weights and BatchNorm statistics
    assert probe.optimizer_state_at_start == 0


def test_run_with_finder_equals_run_with_its_suggestion_preset(swept: tuple) -> None:
    """Model, optimizer and RNG are restored after the sweep: shuffling and weights match exactly."""
    model, _, finder, _ = swept
    preset, _ = fit(None, lr_scale=finder.suggestion)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), preset.state_dict().values(),
                                                 strict=True))


def test_suggestion_rules_on_a_known_curve() -> None:
    finder = LRFinder(min_scale=1e-3, max_scale=1e3, num_steps=61, smoothing=0.0)
    finder.scales = [finder.scale_at(i) for i in range(61)]
    logs = [math.log10(s) for s in finder.scales]
    finder.losses = [2 - math.tanh(x) + (0.5 * (x - 1.5) ** 2 if x > 1.5 else 0.0) for x in logs]
    assert math.log10(finder.suggest()) == pytest.approx(0.0, abs=0.05)  # steepest descent of tanh: x = 0
    finder.suggestion_method = "min_loss"
    best = min(range(61), key=finder.losses.__getitem__)
    assert finder.suggest() == pytest.approx(finder.scales[best] / 10)
    finder.losses = finder.losses[:2]
    assert finder.suggest() is None


def test_a_batch_of_only_unreadable_images_is_skipped_not_taken_for_the_end_of_the_data() -> None:
    """With ``data.bad_images='skip'`` a batch can be ``None``: the sweep goes on with the next batch
    (it used to restart the loader there, and so swept the first batch over and over)."""
    x = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 3, 16, 16).clone()  # every pixel = the sample's index
    data = TensorDataset(x, torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(0)))

    def collate(items: list) -> Any:  # the second batch (samples 4-7) is "unreadable"
        return None if float(items[0][0][0, 0, 0]) == 4 else default_collate(items)

    seed_everything(0)
    model = TransferModule(TinyBackbone(), num_classes=3)
    seen: list[int] = []
    hook = model.backbone.register_forward_pre_hook(lambda _, args: seen.append(int(args[0][0, 0, 0, 0])))

    class StopRecording(Callback):  # after the sweep, before training
        def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
            hook.remove()

    Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[LRFinder(num_steps=6), StopRecording()]).fit(
        model, DataLoader(data, batch_size=4, collate_fn=collate))
    assert seen == [0, 8, 0, 8]


def test_resumed_run_keeps_the_chosen_scale(tmp_path: Path) -> None:
    finder = LRFinder(num_steps=5)
    finder.load_state_dict({"suggestion": 0.3})
    seed_everything(0)
    model = TransferModule(TinyBackbone(), num_classes=3)
    model.lr_scale = 0.3  # what the module's own checkpoint restores
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)))
    Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            callbacks=[finder]).fit(model, DataLoader(data, batch_size=4))
    assert finder.losses == [] and model.lr_scale == 0.3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_scale": 10, "max_scale": 1}, "0 < min_scale < max_scale"),
    ({"num_steps": 2}, "num_steps must be >= 3, got 2"),
    ({"suggestion": "valley"}, "'steepest' or 'min_loss', got 'valley'"),
])
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        LRFinder(**kwargs)
    assert message in str(error.value)


def test_from_the_cli(image_folder: Path, tmp_path: Path) -> None:
    curve = tmp_path / "curve.csv"
    cli = TransferCLI(TransferModule, ImageDataModule, save_config_callback=None, args=[
        "fit", "--model.backbone=conftest.TinyBackbone", "--model.mode=progressive", "--data.root", str(image_folder),
        "--data.batch_size=6", "--data.num_workers=0", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks+=transfer_lit.LRFinder", "--trainer.callbacks.num_steps=6",
        f"--trainer.callbacks.curve_file={curve}",
    ])
    finder = next(c for c in cli.trainer.callbacks if isinstance(c, LRFinder))
    assert cli.model.lr_scale == finder.suggestion
    rows = curve.read_text().splitlines()
    assert rows[0] == "lr_scale,loss,smoothed_loss" and len(rows) == 1 + len(finder.losses)


def test_sweeps_under_true_half_precision() -> None:
    """Lightning converts inputs for ``*-true`` precision before the transfer; the sweep does the same."""
    seed_everything(0)
    model = TransferModule(TinyBackbone(), num_classes=3)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g))
    finder = LRFinder(num_steps=4)
    Trainer(accelerator="cpu", precision="bf16-true", max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[finder]).fit(
        model, DataLoader(data, batch_size=4))
    assert len(finder.losses) == 4 and all(math.isfinite(v) for v in finder.losses)
