"""Does syncing the blocks thawed after DDP wrapped the model slow the training step down?

Two arms of the same two-process DDP run through a Lightning Trainer (CPU and gloo, one thread per rank): a
torchvision MobileNetV2 (random init: the point is step time) with a new head, synthetic images, the same
batches per rank and the same number of steps.

* ``progressive``: ``TransferModule(mode="progressive")`` + ``ProgressiveUnfreezing(schedule={0: "all"})``. Every
  backbone block is frozen when DDP wraps the model, so DDP is told to ignore them, and once thawed (at the start
  of epoch 0) their gradients are averaged by transfer_lit's ``ThawedGradientSync``: one flat all-reduce after
  backward, not overlapped with it.
* ``finetune``: ``TransferModule(mode="finetune")``: plain DDP, whose bucketed all-reduce overlaps the backward
  pass, handles every gradient.

A callback on rank 0 records ``time.perf_counter()`` at each training batch's start, after its backward, before its
optimizer step and at its end; the first ``--warmup`` steps of each fit are not counted. The arms alternate
(progressive, finetune, progressive, ...) in one process pair, so machine noise reaches both; each fit builds a new
model from the same seed. Per arm: the median over repeats of each fit's mean step time; the ratio compares those.

    python benchmarks/ddp_thaw_overhead.py [--steps 30] [--warmup 5] [--repeats 6] [--image-size 64] [--batch-size 16]
    # last line: ddp_thaw_ratio=<progressive step time / finetune step time>
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("transfer_lit") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from transfer_lit import ProgressiveUnfreezing, TorchvisionBackbone, TransferModule  # noqa: E402

ARMS = ("progressive", "finetune")
PHASES = ("forward_backward", "thawed_sync", "optimizer")
NUM_CLASSES, WORLD = 10, 2


class StepTimer(Callback):
    """``perf_counter`` at each training batch's start, after backward, before the optimizer step and at its end.

    transfer_lit's own hooks (the thawed-gradient sync after backward) come after the trainer's callbacks, so the
    interval from this callback's ``on_after_backward`` to its ``on_before_optimizer_step`` holds that sync.
    """

    def __init__(self) -> None:
        self.marks: list[dict[str, float]] = []

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.marks.append({"start": time.perf_counter()})

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.marks[-1]["backward"] = time.perf_counter()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.marks[-1]["synced"] = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.marks[-1]["end"] = time.perf_counter()

    def summary(self, skip: int) -> dict[str, float]:
        """Mean milliseconds per step (the whole step and its phases) over the steps after the first ``skip``, and
        the median step (a burst of other work on the machine moves it less)."""
        marks = self.marks[skip:]
        spans = {"step": ("start", "end"), "forward_backward": ("start", "backward"),
                 "thawed_sync": ("backward", "synced"), "optimizer": ("synced", "end")}
        means = {name: 1000 * statistics.fmean(m[b] - m[a] for m in marks) for name, (a, b) in spans.items()}
        return {**means, "step_median": 1000 * statistics.median(m["end"] - m["start"] for m in marks),
                "steps": len(marks)}


def fit_once(arm: str, data: TensorDataset, args: argparse.Namespace) -> dict[str, float]:
    """One fit of ``arm`` on both ranks; returns rank 0's step times (every rank returns its own)."""
    seed_everything(0)
    model = TransferModule(TorchvisionBackbone(args.backbone, weights=None), NUM_CLASSES, mode=arm,
                           backbone_lr_mult=1.0)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if arm == "progressive":
        callbacks.append(ProgressiveUnfreezing(schedule={0: "all"}))
    trainer = Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=args.warmup + args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True))
    # What DDP was told to leave alone is what transfer_lit all-reduced itself once thawed.
    ignored = len(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    assert not model.frozen_blocks, model.frozen_blocks
    return {**timer.summary(args.warmup), "params_synced_by_transfer_lit": ignored,
            "params": sum(1 for _ in model.parameters())}


def run_ranks(args: argparse.Namespace) -> None:
    """Both ranks (Lightning's launcher starts rank 1 by re-running this command); rank 0 writes ``args.out``."""
    torch.set_num_threads(1)
    n = WORLD * args.batch_size * (args.warmup + args.steps)  # one epoch holds every step of every rank
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, args.image_size, args.image_size, generator=g),
                         torch.randint(0, NUM_CLASSES, (n,), generator=g))
    fits = [{"arm": arm, "repeat": r, **fit_once(arm, data, args)} for r in range(args.repeats) for arm in ARMS]
    if torch.distributed.get_rank() == 0:
        args.out.write_text(json.dumps(fits))


def summarize(fits: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Each arm: the median over repeats of every fit's mean step time (and of its phases and median step)."""
    per_arm = {arm: [f for f in fits if f["arm"] == arm] for arm in ARMS}
    median = {arm: {k: statistics.median(f[k] for f in runs) for k in ("step", *PHASES, "step_median")}
              for arm, runs in per_arm.items()}
    paired = [a["step"] / b["step"] for a, b in zip(per_arm["progressive"], per_arm["finetune"], strict=True)]
    fastest = {arm: min(f["step"] for f in runs) for arm, runs in per_arm.items()}
    return {
        "backbone": args.backbone, "image_size": args.image_size, "batch_size_per_rank": args.batch_size,
        "ranks": WORLD, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "step_ms": {arm: [round(f["step"], 2) for f in runs] for arm, runs in per_arm.items()},
        "median_ms": {arm: {k: round(v, 2) for k, v in m.items()} for arm, m in median.items()},
        "paired_ratios": [round(r, 4) for r in paired],
        "params_synced_by_transfer_lit": {arm: runs[0]["params_synced_by_transfer_lit"]
                                          for arm, runs in per_arm.items()},
        "params": per_arm["finetune"][0]["params"], "timed_steps": min(f["steps"] for f in fits),
        "load_average": [round(v, 2) for v in os.getloadavg()],  # 1, 5, 15 min, at the end of the run
        "median_step_ratio": round(median["progressive"]["step_median"] / median["finetune"]["step_median"], 4),
        "fastest_fit_ratio": round(fastest["progressive"] / fastest["finetune"], 4),
        "ddp_thaw_ratio": round(median["progressive"]["step"] / median["finetune"]["step"], 4),
    }


def report(summary: dict[str, Any]) -> None:
    s = summary
    print(f"{s['backbone']}, {s['ranks']} ranks (cpu, gloo, 1 thread each), {s['image_size']}px, batch "
          f"{s['batch_size_per_rank']} per rank, {s['steps']} timed steps after {s['warmup']} warm-up, "
          f"{s['repeats']} interleaved repeats; ms, median over the repeats")
    print(f"| {'arm':<11} | mean step | median step | fwd+bwd | thawed sync | optimizer | synced by transfer_lit | "
          f"mean step of each repeat |")
    print(f"|{'-' * 13}|-----------|-------------|---------|-------------|-----------|------------------------|"
          f"--------------------------|")
    for arm in ARMS:
        m = s["median_ms"][arm]
        runs = " ".join(f"{v:.1f}" for v in s["step_ms"][arm])
        synced = f"{s['params_synced_by_transfer_lit'][arm]} / {s['params']} tensors"
        print(f"| {arm:<11} | {m['step']:9.1f} | {m['step_median']:11.1f} | {m['forward_backward']:7.1f} | "
              f"{m['thawed_sync']:11.1f} | {m['optimizer']:9.1f} | {synced:>22} | {runs} |")
    ratios = sorted(s["paired_ratios"])
    print(f"progressive / finetune per repeat: {' '.join(f'{r:.3f}' for r in s['paired_ratios'])} "
          f"(median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    print(f"median-step ratio {s['median_step_ratio']:.3f}, fastest-fit ratio {s['fastest_fit_ratio']:.3f}, "
          f"load average at the end {s['load_average']}")
    print(json.dumps(summary))
    print(f"ddp_thaw_ratio={s['ddp_thaw_ratio']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2", help="torchvision architecture (random init)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=5, help="steps per fit not timed")
    parser.add_argument("--repeats", type=int, default=6, help="fits per arm, interleaved")
    parser.add_argument("--ranks", action="store_true", help=argparse.SUPPRESS)  # internal: the DDP run itself
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("image_size", "batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.ranks:
        run_ranks(args)
        return {}
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fits.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--ranks", "--out", str(out),
                   "--backbone", args.backbone, "--image-size", str(args.image_size),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the DDP run failed with exit code {done.returncode}")
        fits = json.loads(out.read_text())
    summary = summarize(fits, args)
    report(summary)
    return summary


if __name__ == "__main__":
    main()
