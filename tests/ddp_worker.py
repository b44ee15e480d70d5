"""Two-process CPU (gloo) runs through a Lightning Trainer, for tests/test_ddp.py.

    python tests/ddp_worker.py OUT_DIR [ddp|union|text MODEL_DIR TRAIN_TSV]

Lightning's launcher re-runs this script for rank 1. ``ddp``: the data differ per rank (the sampler
Lightning injects shards them), the backbone is thawed mid-training (block2 at epoch 1, block1 at epoch 2,
the stem stays frozen) and an LRFinder sweep runs first. Each rank saves ``OUT_DIR/rank{r}.pt``: its
initial and final state dict, the parameters with optimizer state (and its largest value), its
``lr_scale`` and a checksum of the batches it saw. ``union``: the same thaws on a BatchNorm-free MLP with
SGD, saving the final state dict, to compare against one process trained on the union of the two ranks'
batches (:func:`union_run`). ``text``: a tiny BERT (``MODEL_DIR``) thawed the same way on length-bucketed
text batches (``TRAIN_TSV``), saving the final state dict and a checksum of the token ids each rank saw.
``metric``: metric-driven phases with ``restore_best`` and ``bn_policy: train_bn``, on a score that differs
per rank (rank 1's alone would never end a phase), saving the phase starts, the weights at each epoch start and
after each validation, and the final state dict.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from conftest import MLPBackbone, TinyBackbone
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, Sampler, TensorDataset

from transfer_lit import LRFinder, ProgressiveUnfreezing, TransferModule


class DataChecksum(Callback):
    """Sum of every input batch this rank trained on (differs across ranks when their data differ)."""

    def __init__(self) -> None:
        self.total = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.total += float(batch[0].double().sum())


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class UnionBatches(Sampler[list[int]]):
    """One process's batches = the union of what each of ``world`` DDP ranks trains on at the same step.

    Lightning gives every DDP training loader a ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``:
    in epoch ``e`` rank ``r`` reads ``randperm(n, seed + e)[r::world]`` in batches of ``per_rank``. Each
    iteration is the next epoch (Lightning calls ``set_epoch`` only on distributed samplers).
    """

    def __init__(self, n: int, world: int, per_rank: int, seed: int = 0) -> None:
        self.n, self.world, self.per_rank, self.seed, self.epoch = n, world, per_rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        self.epoch += 1
        shards = [order[r::self.world] for r in range(self.world)]
        for k in range(0, len(shards[0]), self.per_rank):
            yield [i for shard in shards for i in shard[k:k + self.per_rank]]

    def __len__(self) -> int:
        return -(-(self.n // self.world) // self.per_rank)


def union_run(devices: int, epochs: int = 3) -> TransferModule:
    """A progressive run of :class:`MLPBackbone` with SGD: on 2 DDP ranks (batches of 4 each), or in one process
    on the union of the two ranks' batches (``devices=1``)."""
    torch.set_num_threads(1)
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 12, generator=g), torch.randint(0, 3, (48,), generator=g))
    model = TransferModule(MLPBackbone(), num_classes=3, mode="progressive", optimizer=_sgd, backbone_lr_mult=0.5)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        callbacks=[ProgressiveUnfreezing(schedule={1: "block2", 2: "block1"}, warmup_steps=2)],
    )
    loader = (DataLoader(data, batch_size=4, shuffle=True) if devices > 1
              else DataLoader(data, batch_sampler=UnionBatches(len(data), world=2, per_rank=4)))
    trainer.fit(model, loader)
    return model


def text_run(out: Path, model_dir: str, train: str) -> None:
    from transfer_lit import HFTextBackbone, TextDataModule

    torch.set_num_threads(1)
    seed_everything(0)
    data = TextDataModule(train_csv=train, batch_size=4, val_fraction=0.25)
    model = TransferModule(HFTextBackbone(model_dir), num_classes=2, mode="progressive", lr=3e-3, backbone_lr_mult=1.0)
    seen: list[float] = []

    class TokenChecksum(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen.append(float(batch[0]["input_ids"].double().sum()))

    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ProgressiveUnfreezing(schedule={1: "layer.1", 2: "all"}, warmup_steps=2), TokenChecksum()],
    )
    trainer.fit(model, data)
    final = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    torch.save({"final": final, "frozen": sorted(model.frozen_blocks), "data": seen, "world_size": trainer.world_size},
               out / f"rank{trainer.global_rank}.pt")


SCRIPTS = [[0.5, 0.4, 0.6, 0.7, 0.65, 0.6, 0.9, 0.9], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]


class RankScore(TransferModule):
    """Logs ``score``: this rank's own script (not synced), so only one decision for all ranks keeps them equal."""

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("score", SCRIPTS[self.global_rank][self.current_epoch])


def metric_run(out: Path) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 3, (48,), generator=g))
    model = RankScore(TinyBackbone(), num_classes=3, mode="progressive", lr=0.05, backbone_lr_mult=0.1,
                      bn_policy="train_bn")
    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    class Snapshots(Callback):
        def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
            snapshots[f"start{trainer.current_epoch}"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                snapshots[f"val{trainer.current_epoch}"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    callback = ProgressiveUnfreezing(schedule={2: "block2", 4: "block1"}, monitor="score", monitor_mode="max",
                                     restore_best=True)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[callback, Snapshots()],
    )
    loader = DataLoader(data, batch_size=4, shuffle=True)
    trainer.fit(model, loader, DataLoader(data, batch_size=8))
    torch.save({"starts": callback.starts, "epochs": trainer.current_epoch, "snapshots": snapshots,
                "frozen": sorted(model.frozen_blocks)}, out / f"rank{trainer.global_rank}.pt")


def main(out: Path, strategy: str) -> None:
    if strategy == "metric":
        metric_run(out)
        return
    if strategy == "text":
        text_run(out, sys.argv[3], sys.argv[4])
        return
    if strategy == "union":
        model = union_run(devices=2)
        final = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        torch.save({"final": final, "frozen": sorted(model.frozen_blocks)}, out / f"rank{model.global_rank}.pt")
        return
    torch.set_num_threads(1)
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 3, (48,), generator=g))
    model = TransferModule(TinyBackbone(), num_classes=3, mode="progressive", lr=0.05, backbone_lr_mult=0.1)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    checksum = DataChecksum()
    callbacks: list[Callback] = [LRFinder(num_steps=8, min_scale=0.1, max_scale=10),
                                 ProgressiveUnfreezing(schedule={1: "block2", 2: "block1"}, warmup_steps=2), checksum]
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, logger=False,
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
