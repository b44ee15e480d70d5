"""The training step never reads device values on the host (on CUDA each read stalls the step), checked on CPU.

A ``TorchFunctionMode`` records every call that would copy a CUDA tensor to the host or wait for its
values (``item``, ``bool``, ``tolist``, ``bincount``, ``unique``, boolean indexing, ...) between the third
training batch and the end of the epoch, with the package's default callbacks and a logger. Two reads
are not device syncs and are left out: the optimizer's step counters (host tensors on every device unless
fused) and the finiteness check's read of its own pinned host copy (``finite_check._read_host_copy``).
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import FaultTolerance, ImageDataModule, NonFiniteLossError, TransferModule
from transfer_lit.data.feature_cache import FeatureDataset
from transfer_lit.finite_check import LossWatch, NonFiniteLoss
from transfer_lit.metrics import MulticlassRates, build_metrics, build_train_metrics

HOST_READS = {"item", "__bool__", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
              "argwhere", "unique", "_unique2", "unique_consecutive", "masked_select", "bincount", "repeat_interleave"}
NOT_A_SYNC = ("torch/optim/", "finite_check.py:_read_host_copy")


class HostReads(TorchFunctionMode):
    """Counts host reads by where they come from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" and len(args) > 1 else None
        bool_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                         for i in (index if isinstance(index, tuple) else (index,)))
        if name in HOST_READS or bool_index:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/overrides" not in f.filename]
            where = " <- ".join(f"{Path(f.filename).name}:{f.name}" for f in reversed(frames[-4:]))
            if not any(tag in f"{f.filename}:{f.name}" for f in frames[-3:] for tag in NOT_A_SYNC):
                self.seen[f"{name} at {where}"] += 1
        return func(*args, **(kwargs or {}))


class Window(Callback):
    """Counts from the start of batch ``first`` to the end of the epoch's last batch (epoch-end work excluded)."""

    def __init__(self, first: int = 2) -> None:
        self.first, self.mode, self.active = first, HostReads(), False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first and not self.active:
            self.mode.__enter__()
            self.active = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.active and batch_idx == trainer.num_training_batches - 1:
            self.mode.__exit__(None, None, None)
            self.active = False


def _fit(tmp_path: Path, module: TransferModule, batches: int = 10) -> Counter[str]:
    g = torch.Generator().manual_seed(0)
    n = 4 * batches
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
    window = Window()
    callbacks = [window, ModelCheckpoint(monitor="train_loss", dirpath=tmp_path), LearningRateMonitor("epoch"),
                 FaultTolerance()]
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=CSVLogger(tmp_path), log_every_n_steps=50, enable_progress_bar=True,
                      enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4))
    return window.mode.seen


@pytest.mark.parametrize("mode", ["finetune", "linear_probe", "progressive"])
def test_sync_free_training_steps_read_nothing_on_the_host(tmp_path: Path, one_thread: None, mode: str) -> None:
    torch.manual_seed(0)
    module = TransferModule(TinyBackbone(), num_classes=3, mode=mode)  # type: ignore[arg-type]
    module.sync_free = True  # what CUDA gets by default
    assert _fit(tmp_path, module) == Counter()


def test_sync_free_linear_probe_on_cached_features(tmp_path: Path, one_thread: None, image_folder: Path) -> None:
    torch.manual_seed(0)
    module = TransferModule(TinyBackbone(), num_classes=3, mode="linear_probe")
    module.sync_free = True
    data = ImageDataModule(root=str(image_folder), batch_size=4, num_workers=0, cache_features=True)
    window = Window()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=CSVLogger(tmp_path), log_every_n_steps=50, enable_progress_bar=True,
                      enable_model_summary=False, callbacks=[window, FaultTolerance()], default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert isinstance(trainer.train_dataloader.dataset, FeatureDataset)  # the head trained on cached features
    assert trainer.num_training_batches >= 8 and window.mode.seen == Counter()


def test_the_counter_sees_the_reads_a_cpu_run_makes(tmp_path: Path, one_thread: None) -> None:
    """On CPU (sync_free off) the loss check and the progress bar read the loss every step: the counter sees them."""
    torch.manual_seed(0)
    seen = _fit(tmp_path, TransferModule(TinyBackbone(), num_classes=3, mode="finetune"))
    by_kind = Counter(key.split(" at ")[0] for key in seen.elements())
    assert by_kind["item"] >= 2 * 8, seen  # the loss check's and the progress bar's, each step


class NaNAt(Callback):
    """Fills the input of training batch ``index`` (-1: the epoch's last) with NaN; counts validation batches."""

    def __init__(self, index: int) -> None:
        self.index, self.validated = index, 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        if i == (trainer.num_training_batches - 1 if self.index < 0 else self.index):
            batch[0].fill_(float("nan"))

    def on_validation_batch_start(self, *args: Any) -> None:
        self.validated += 1


def _fit_until_nan(samples: int, *callbacks: Callback, validate: bool = False) -> tuple[Trainer, str]:
    """A sync-free (CUDA-mode) finetune on CPU that must stop with NonFiniteLossError; returns its message."""
    torch.manual_seed(0)
    module = TransferModule(TinyBackbone(), num_classes=3, mode="finetune")
    module.sync_free = True
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 3, 32, 32, generator=g), torch.randint(0, 3, (samples,), generator=g))
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, num_sanity_val_steps=0,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4) if validate else None)
    return trainer, str(error.value)


def test_deferred_check_stops_two_steps_late_and_says_so(one_thread: None) -> None:
    trainer, message = _fit_until_nan(40, NaNAt(3))
    assert message.startswith("training loss is nan at global step 3 (epoch 0), seen 2 step(s) later")
    assert "the input batch holds non-finite values" in message
    assert trainer.global_step == 5  # read two steps later (the same step on every DDP rank), not at epoch end


def test_a_late_nan_stops_the_run_before_validation_and_its_checkpoint(tmp_path: Path, one_thread: None) -> None:
    probe = NaNAt(-1)
    _, message = _fit_until_nan(24, probe, ModelCheckpoint(dirpath=tmp_path), validate=True)
    assert "global step 5 (epoch 0), seen 1 step(s) later" in message
    assert probe.validated == 0 and not list(tmp_path.glob("*.ckpt"))


def test_a_checkpoint_saved_mid_epoch_is_never_one_a_nan_step_broke(tmp_path: Path, one_thread: None) -> None:
    class SaveAtStep3(Callback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            if trainer.global_step == 3:  # one step after the NaN: the deferred check has not read it yet
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    _, message = _fit_until_nan(40, NaNAt(2), SaveAtStep3())
    assert "global step 2 (epoch 0), seen 1 step(s) later" in message
    assert not (tmp_path / "mid.ckpt").exists()


def test_loss_watch_reads_each_step_two_steps_later_and_flushes() -> None:
    watch = LossWatch(deferred=True)
    x = torch.ones(2)
    assert watch.watch(torch.tensor(1.0), x, step=0, epoch=0) is None
    assert watch.watch(torch.tensor(float("inf")), x, step=1, epoch=0) is None
    assert watch.watch(torch.tensor(2.0), x, step=2, epoch=0) is None  # step 0 read here: finite
    assert watch.watch(torch.tensor(3.0), x, step=3, epoch=0) == watch_result(float("inf"), 1, late=2)
    assert watch.watch(torch.tensor(float("-inf")), x, step=4, epoch=0) is None
    assert watch.flush(step=5) == watch_result(float("-inf"), 4, late=1) and not watch.pending
    immediate = LossWatch(deferred=False)
    assert immediate.watch(torch.tensor(float("nan")), x, step=5, epoch=2).steps_late == 0  # type: ignore[union-attr]


def watch_result(loss: float, step: int, late: int) -> NonFiniteLoss:
    return NonFiniteLoss(loss, step, 0, True, late)


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_multiclass_rates_equal_torchmetrics(num_classes: int) -> None:
    g = torch.Generator().manual_seed(num_classes)
    ours, reference = build_train_metrics("multiclass", num_classes), build_metrics("multiclass", num_classes, "train")
    for n in (9, 1, 17, 4):
        probs = torch.rand(n, num_classes, generator=g).softmax(-1)
        target = torch.randint(0, num_classes - 1, (n,), generator=g)  # the last class never occurs
        ours.update(probs, target)
        reference.update(probs, target)
    expected = reference.compute()
    got = ours.compute()
    assert sorted(got) == ["train_acc", "train_f1", "train_precision", "train_recall"]
    for key, value in got.items():
        assert torch.allclose(value, expected[key].float(), atol=1e-6), key
    assert isinstance(ours["rates"], MulticlassRates)


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text (c10/cuda/CUDAFunctions.cpp)


class CudaSyncWarnings(Callback):
    """``torch.cuda.set_sync_debug_mode('warn')`` from batch 2 to the epoch's last batch; records the warnings."""

    def __init__(self) -> None:
        self.caught: list[str] = []
        self._catcher: Any = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 2:
            import warnings

            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._catcher is not None and batch_idx == trainer.num_training_batches - 1:
            torch.cuda.set_sync_debug_mode("default")
            # Not "synchroniz": the first use also warns that the detector is a prototype.
            self.caught = [str(w.message) for w in self._records if SYNC_WARNING in str(w.message)]
            self._catcher.__exit__(None, None, None)
            self._catcher = None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["finetune", "linear_probe"])
def test_cuda_training_steps_never_synchronize(tmp_path: Path, mode: str) -> None:
    """On a real GPU, torch's own sync detector sees no synchronizing call in the training steps."""
    torch.manual_seed(0)
    module = TransferModule(TinyBackbone(), num_classes=3, mode=mode)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 3, (40,), generator=g))
    watcher = CudaSyncWarnings()
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, limit_val_batches=0,
                      logger=CSVLogger(tmp_path), log_every_n_steps=50, enable_progress_bar=True,
                      enable_model_summary=False, callbacks=[watcher, FaultTolerance()], default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4, pin_memory=True))
    assert watcher.caught == []
    probe = CudaSyncWarnings()  # the detector and the filter do see a deliberate host read
    probe.on_train_batch_start(trainer, module, None, 2)
    torch.ones(1, device="cuda").item()
    probe.on_train_batch_end(trainer, module, None, None, trainer.num_training_batches - 1)
    assert probe.caught
