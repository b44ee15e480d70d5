"""A two-process CPU (gloo) run through a Lightning Trainer, for tests/test_ddp.py.

    python tests/ddp_worker.py OUT_DIR [ddp|fsdp]

``ddp``: two CPU processes (gloo); Lightning's launcher re-runs this script for rank 1. ``fsdp``: one
GPU, to exercise the gate-only freezing path (torch's FSDP refuses CPU). The data differ per rank (the sampler Lightning
injects shards them), the backbone is thawed mid-training (block2 at epoch 1, block1 at epoch 2, the
stem stays frozen) and an LRFinder sweep runs first. Each rank saves ``OUT_DIR/rank{r}.pt``: its
initial and final state dict, the parameters with optimizer state (and its largest value), its
``lr_scale`` and a checksum of the batches it saw.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from conftest import TinyBackbone
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import LRFinder, ProgressiveUnfreezing, TransferModule


class DataChecksum(Callback):
    """Sum of every input batch this rank trained on (differs across ranks when their data differ)."""

    def __init__(self) -> None:
        self.total = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.total += float(batch[0].double().sum())


def main(out: Path, strategy: str) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 3, (48,), generator=g))
    model = TransferModule(TinyBackbone(), num_classes=3, mode="progressive", lr=0.05, backbone_lr_mult=0.1)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    checksum = DataChecksum()
    callbacks: list[Callback] = [ProgressiveUnfreezing(schedule={1: "block2", 2: "block1"}, warmup_steps=2), checksum]
    if strategy == "ddp":
        callbacks.insert(0, LRFinder(num_steps=8, min_scale=0.1, max_scale=10))
    # torch's FSDP refuses CPU: the fsdp mode is a one-GPU check of the gate-only freezing path.
    gpu = strategy == "fsdp"
    trainer = Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1 if gpu else 2, strategy=strategy, max_epochs=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True))
    final = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    parameters = [n for n, _ in model.named_parameters()]
    state = trainer.optimizers[0].state
    optimizer_state = {n: max(float(v.abs().max()) for k, v in state[p].items() if k != "step")  # largest moment
                       for n, p in model.named_parameters() if p in state}
    requires_grad = [n for n, p in model.named_parameters() if p.requires_grad]
    torch.save({"initial": initial, "final": final, "parameters": parameters, "optimizer_state": optimizer_state,
                "requires_grad": requires_grad, "lr_scale": model.lr_scale, "data": checksum.total,
                "frozen": sorted(model.frozen_blocks), "world_size": trainer.world_size, "strategy": strategy},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
