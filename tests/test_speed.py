"""transfer_lit.speed: GPU defaults that need no flags (trainer settings, TF32, channels_last) and the torch.compile
option, as far as CPU can check them; process-wide settings are put back."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import ModuleBackbone, ProgressiveUnfreezing, TorchvisionBackbone, TransferModule
from transfer_lit.speed import BackboneSpeed, apply_gpu_defaults, is_convolutional, keep_freed_memory, prefer_tf32


def _loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=4)


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_convolutional_backbones_are_recognised() -> None:
    assert is_convolutional(TinyBackbone())
    assert is_convolutional(TorchvisionBackbone("resnet18", weights=None))
    assert is_convolutional(TorchvisionBackbone("mobilenet_v3_small", weights=None))
    assert not is_convolutional(TorchvisionBackbone("vit_b_16", weights=None))  # only the patch embedding is a conv
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8))
    assert not is_convolutional(ModuleBackbone(mlp, num_features=8))


def test_channels_last_is_a_noop_on_cpu(tmp_path: Path) -> None:
    module = TransferModule(TinyBackbone(), num_classes=3, mode="finetune")
    _trainer(tmp_path, max_epochs=1).fit(module, _loader())
    assert not module.speed.channels_last
    conv = module.backbone.stem[0].weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_on_cuda(tmp_path: Path) -> None:
    module = TransferModule(TinyBackbone(), num_classes=3, mode="finetune")
    Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, default_root_dir=tmp_path).fit(module, _loader())
    assert module.speed.channels_last
    assert module.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


class BlockSnapshots(Callback):
    """The first weight of stem, block1 and block2 at train start and at each epoch end, on the CPU."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def _take(self, pl_module: Any) -> None:
        self.snapshots.append({b: getattr(pl_module.backbone, b)[0].weight.detach().cpu().clone()
                               for b in ("stem", "block1", "block2")})

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._take(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._take(pl_module)


def _thaw_clip_resume(tmp_path: Path, accelerator: str, precision: str) -> list[tuple[Trainer, BlockSnapshots]]:
    """Fit 2 epochs (block2 thawed at epoch 1; clipping at 1e-3, so it always engages), then resume for a third."""
    runs = []
    for max_epochs, ckpt_path in ((2, None), (3, tmp_path / "last.ckpt")):
        seed_everything(0)
        module = TransferModule(TinyBackbone(), num_classes=3, mode="progressive")
        snapshots = BlockSnapshots()
        trainer = Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=max_epochs,  # type: ignore[arg-type]
                          gradient_clip_val=1e-3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[ProgressiveUnfreezing(schedule={1: "block2"}), snapshots,
                                     ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                          default_root_dir=tmp_path)
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
        runs.append((trainer, snapshots))
    return runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_cuda_fused_adamw_survives_thaw_clipping_scaler_and_resume(tmp_path: Path, precision: str) -> None:
    """CUDA's fused AdamW across a mid-run thaw, with gradient clipping, fp16's grad scaler and a resume."""
    (first, seen), (resumed, seen_resumed) = _thaw_clip_resume(tmp_path, "gpu", precision)
    for trainer in (first, resumed):
        assert all(g.get("fused") for g in trainer.optimizers[0].param_groups)
        assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    start, epoch0, epoch1 = seen.snapshots
    assert torch.equal(epoch0["block2"], start["block2"])  # frozen in epoch 0
    assert not torch.equal(epoch1["block2"], epoch0["block2"])  # thawed at epoch 1, and the scaler let steps through
    resumed_start, resumed_end = seen_resumed.snapshots
    assert torch.equal(resumed_start["block2"], epoch1["block2"])  # the resume starts from last.ckpt's weights
    assert not torch.equal(resumed_end["block2"], epoch1["block2"])  # and block2 keeps training
    for frozen in ("stem", "block1"):  # never thawed
        assert torch.equal(resumed_end[frozen], start[frozen])
    assert resumed.current_epoch == 3


class ThawAt(Callback):
    """Thaw every block at ``epoch`` and record the block2 weights before it."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.before: torch.Tensor | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            self.before = pl_module.backbone.block2[0].weight.detach().clone()
            pl_module.set_frozen_blocks([])


@pytest.mark.slow
def test_compiled_blocks_train_across_a_thaw(tmp_path: Path) -> None:
    """torch.compile on CPU (inductor + a C++ compiler): the thawed block recompiles and then trains."""
    results = []
    for compile in (False, True):
        seed_everything(0)
        # SGD: AdamW would blow the float noise on gradients that are zero in exact arithmetic (a conv bias
        # followed by BatchNorm) up to full-size steps, and eager and compiled kernels round differently.
        module = TransferModule(TinyBackbone(), num_classes=3, mode="progressive", lr=0.05, backbone_lr_mult=1.0,
                                optimizer=lambda groups: torch.optim.SGD(groups, momentum=0.9), compile=compile)
        thaw = ThawAt(epoch=1)
        _trainer(tmp_path, max_epochs=2, callbacks=[thaw]).fit(module, _loader())
        assert thaw.before is not None
        assert not torch.equal(module.backbone.block2[0].weight, thaw.before)  # gradients reached the thawed block
        results.append(module)
    eager, compiled = results
    assert compiled.backbone._compiled_call_impl is not None
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoint keys unchanged
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_is_harmless() -> None:
    keep_freed_memory()  # the CLI calls it first thing; calling it again must be fine
    x = torch.randn(64, 64, 64, 64)  # 64 MB: above glibc's mmap threshold
    del x
    assert torch.randn(64, 64, 64, 64).sum().isfinite()


@pytest.mark.slow
def test_overhead_benchmark_prints_its_ratio() -> None:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "1", "--repeats", "1", "--image-size", "32"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("overhead_ratio=") and float(last.split("=")[1]) > 0


def test_gpu_defaults_fill_only_what_the_user_left_unset() -> None:
    unset: dict = {"precision": None, "benchmark": None}
    apply_gpu_defaults(unset, cuda=True, bf16=True)
    assert unset == {"precision": "bf16-mixed", "benchmark": True}
    chosen = {"precision": "32-true", "benchmark": False}
    apply_gpu_defaults(chosen, cuda=True, bf16=True)
    assert chosen == {"precision": "32-true", "benchmark": False}
    deterministic = {"precision": None, "benchmark": None, "deterministic": True}
    apply_gpu_defaults(deterministic, cuda=True, bf16=False)  # a GPU without bf16 keeps full precision
    assert deterministic == {"precision": None, "benchmark": None, "deterministic": True}
    cpu: dict = {"precision": None, "benchmark": None}
    apply_gpu_defaults(cpu, cuda=False, bf16=False)
    assert cpu == {"precision": None, "benchmark": None}


def test_tf32_is_switched_on_for_cuda_only_and_restored() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        restore = prefer_tf32(cuda=True)
        assert torch.get_float32_matmul_precision() == "high"
        restore()
        assert torch.get_float32_matmul_precision() == "highest"
        prefer_tf32(cuda=False)
        assert torch.get_float32_matmul_precision() == "highest"
        torch.set_float32_matmul_precision("medium")  # the user's own choice is kept
        prefer_tf32(cuda=True)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_recompile_limit_is_raised_for_a_compiled_run_and_restored_after(tiny_backbone: TinyBackbone) -> None:
    config = torch._dynamo.config
    before = config.cache_size_limit
    try:
        config.cache_size_limit = 4
        speed = BackboneSpeed(compile=True)
        speed.apply(tiny_backbone, torch.device("cpu"), num_blocks=12)  # compiles lazily: nothing runs yet
        assert speed.compiled and config.cache_size_limit == 2 * 12 + 8
        speed.restore()
        assert config.cache_size_limit == 4
        speed.apply(tiny_backbone, torch.device("cpu"), num_blocks=12)  # a second fit raises it again
        assert config.cache_size_limit == 32
        speed.restore()
        assert config.cache_size_limit == 4 and not BackboneSpeed().channels_last
    finally:
        config.cache_size_limit = before
