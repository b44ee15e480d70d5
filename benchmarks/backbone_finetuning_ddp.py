"""Do DDP ranks still hold the same weights after the backbone is thawed mid-training?

Two runs of the same setup, each as a two-process DDP run through a Lightning Trainer (CPU and gloo
by default, so it runs anywhere): a torchvision ResNet-18 (random init) with a new head, trained on
different random data per rank (the DistributedSampler Lightning injects shards one dataset), the
backbone frozen for epoch 0 and thawed at epoch 1.

* ``backbone_finetuning``: Lightning's ``BackboneFinetuning`` callback on the module its docs describe
  (``self.backbone`` + head, optimizer over the trainable parameters). DDP registered only the
  parameters that required grad when it wrapped the model, so the thawed backbone's gradients are
  never all-reduced and the ranks drift apart (Lightning issue #20340).
* ``transfer_lit``: ``TransferModule(mode="progressive")`` + ``ProgressiveUnfreezing``: the module keeps
  the blocks frozen at wrap time out of DDP and all-reduces their gradients itself once thawed.

Prints, per run, the largest absolute difference of any parameter between the two ranks, how many
parameter tensors differ, and how far the backbone moved from its initial weights (it must have
trained for the comparison to mean anything); the LAST line is one JSON object.

    python benchmarks/backbone_finetuning_ddp.py [--epochs 3] [--backbone resnet18] [--accelerator cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("transfer_lit") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from transfer_lit import ProgressiveUnfreezing, TorchvisionBackbone, TransferModule  # noqa: E402

VARIANTS = ("backbone_finetuning", "transfer_lit")
LR, BACKBONE_LR_MULT, NUM_CLASSES = 1e-3, 0.1, 4


class PlainFinetuner(LightningModule):
    """The module ``BackboneFinetuning`` expects: ``self.backbone``, a head, an optimizer over trainable params."""

    def __init__(self, backbone: nn.Module, num_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, NUM_CLASSES)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)


def run_rank(variant: str, out: Path, epochs: int, backbone_name: str, accelerator: str) -> None:
    """One rank of one run (Lightning's launcher starts the second rank by re-running this command)."""
    torch.set_num_threads(1)
    seed_everything(0)
    backbone = TorchvisionBackbone(backbone_name, weights=None)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (64,), generator=g))
    if variant == "transfer_lit":
        model: LightningModule = TransferModule(backbone, NUM_CLASSES, mode="progressive", lr=LR,
                                                backbone_lr_mult=BACKBONE_LR_MULT)
        callback = ProgressiveUnfreezing(schedule={1: "all"})
        backbone_params = dict(model.backbone.named_parameters())
    else:
        model = PlainFinetuner(backbone, backbone.num_features)
        callback = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0,
                                      backbone_initial_ratio_lr=BACKBONE_LR_MULT, train_bn=True)
        backbone_params = dict(model.backbone.named_parameters())
    initial = {n: p.detach().clone() for n, p in backbone_params.items()}
    trainer = Trainer(accelerator=accelerator, devices=2, strategy="ddp", max_epochs=epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback])
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    moved = max((p.detach().cpu() - initial[n].cpu()).abs().max().item() for n, p in backbone_params.items())
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    torch.save({"params": params, "backbone_moved": moved}, out / f"rank{trainer.global_rank}.pt")


def compare(out: Path) -> dict[str, float]:
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    diffs = {n: (ranks[0]["params"][n] - ranks[1]["params"][n]).abs().max().item() for n in ranks[0]["params"]}
    return {"max_abs_diff_across_ranks": max(diffs.values()),
            "differing_tensors": sum(d > 0 for d in diffs.values()), "tensors": len(diffs),
            "backbone_moved": ranks[0]["backbone_moved"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default="resnet18", help="torchvision architecture (random init)")
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl, needs 2 GPUs)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one run
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_rank(args.variant, args.out, args.epochs, args.backbone, args.accelerator)
        return
    results: dict[str, dict[str, float]] = {}
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = Path(tmp) / variant
            out.mkdir()
            start = time.perf_counter()
            command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--out", str(out),
                       "--epochs", str(args.epochs), "--backbone", args.backbone, "--accelerator", args.accelerator]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"[{variant}] failed with exit code {done.returncode}")
            results[variant] = {**compare(out), "seconds": round(time.perf_counter() - start, 1)}
    print(f"{args.backbone}, 2 ranks ({args.accelerator}), different data per rank, backbone thawed at epoch 1 "
          f"of {args.epochs}")
    print(f"{'run':<22}{'max |rank0 - rank1|':>22}{'differing tensors':>20}{'backbone moved':>17}{'seconds':>10}")
    for variant, r in results.items():
        print(f"{variant:<22}{r['max_abs_diff_across_ranks']:>22.3e}"
              f"{r['differing_tensors']:>12} / {r['tensors']:<5}{r['backbone_moved']:>17.3e}{r['seconds']:>10}")
    print(json.dumps({v: r["max_abs_diff_across_ranks"] for v, r in results.items()}))


if __name__ == "__main__":
    main()
