"""transfer_lit ``fit`` vs a hand-written PyTorch loop doing the same work, on CPU.

Same network (one TransferModule's backbone + head, deep-copied), same in-memory data and order,
batch size, fp32, number of steps, AdamW with the same named parameter groups. The two arms run
interleaved, several times each, after one warm-up each; the medians are compared.

The transfer_lit arm is ``Trainer.fit`` with Lightning's defaults (progress bar included) and the
module's per-step metrics and finite-loss check; checkpoint files and logger output are switched off
because the hand-written loop writes nothing either.

    python benchmarks/overhead.py            # last line: overhead_ratio=<transfer_lit time / raw time>
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer_lit import ModuleBackbone, TorchvisionBackbone, TransferModule
from transfer_lit.param_groups import build_param_groups


def loader(data: TensorDataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def run_transfer_lit(template: TransferModule, data: TensorDataset, args: argparse.Namespace) -> tuple[float, float]:
    module = copy.deepcopy(template)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=args.steps, precision="32-true", logger=False,
                      enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=loader(data, args.batch_size, 0))
    return time.perf_counter() - start, time.process_time() - cpu


def run_raw(template: TransferModule, data: TensorDataset, args: argparse.Namespace) -> tuple[float, float]:
    backbone, head = copy.deepcopy(template.backbone), copy.deepcopy(template.head)
    start, cpu = time.perf_counter(), time.process_time()
    probe = args.mode == "linear_probe"
    backbone.train(not probe)
    optimizer = torch.optim.AdamW(build_param_groups(backbone, head, template.policy))
    step = 0
    while step < args.steps:
        for x, y in loader(data, args.batch_size, 0):
            optimizer.zero_grad(set_to_none=True)  # before the forward pass, as Lightning does
            with torch.set_grad_enabled(not probe):
                features = backbone(x)
            loss = F.cross_entropy(head(features), y)
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.steps:
                break
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--mode", default="finetune", choices=["finetune", "linear_probe"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    template = TransferModule(TorchvisionBackbone(args.backbone, weights=None), num_classes=10, mode=args.mode,
                              backbone_lr_mult=1.0)
    n = args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, 3, args.image_size, args.image_size), torch.randint(0, 10, (n,)))
    arms = {"transfer_lit fit": run_transfer_lit, "hand-written loop": run_raw}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for fn in arms.values():  # warm-up: allocator, oneDNN primitive caches, lazy imports
        fn(template, data, argparse.Namespace(**{**vars(args), "steps": 2}))
    for _ in range(args.repeats):
        for name, fn in arms.items():
            times[name].append(fn(template, data, args))

    print(f"{args.backbone} {args.mode}, {args.image_size}px, batch {args.batch_size}, {args.steps} steps, fp32, "
          f"CPU threads {torch.get_num_threads()}, {args.repeats} interleaved repeats")
    print(f"| {'path':<18} | median wall s | per step ms | median CPU s | wall s of each run |")
    print(f"|{'-' * 20}|---------------|-------------|--------------|--------------------|")
    wall, cpu = {}, {}
    for name, values in times.items():
        wall[name] = statistics.median(w for w, _ in values)
        cpu[name] = statistics.median(c for _, c in values)
        runs = " ".join(f"{w:.2f}" for w, _ in values)
        step_ms = 1000 * wall[name] / args.steps
        print(f"| {name:<18} | {wall[name]:13.2f} | {step_ms:11.1f} | {cpu[name]:12.2f} | {runs} |")
    # The framework's own cost per step, isolated: a one-conv network whose step takes a few milliseconds.
    torch.manual_seed(0)
    tiny = TransferModule(ModuleBackbone(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8),
                          num_classes=10, mode="finetune", backbone_lr_mult=1.0)
    tiny_args = argparse.Namespace(steps=200, batch_size=8, mode="finetune")
    tiny_data = TensorDataset(torch.randn(1600, 3, 16, 16), torch.randint(0, 10, (1600,)))
    per_step = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            per_step[name].append(1000 * fn(tiny, tiny_data, tiny_args)[0] / tiny_args.steps)
    tiny_ms = {name: statistics.median(v) for name, v in per_step.items()}
    print(f"one-conv network, 200 steps of batch 8: transfer_lit {tiny_ms['transfer_lit fit']:.1f} ms/step, "
          f"hand-written {tiny_ms['hand-written loop']:.1f} ms/step: framework cost "
          f"{tiny_ms['transfer_lit fit'] - tiny_ms['hand-written loop']:.1f} ms/step")
    # On a shared machine the spread is wide: the fastest runs and the process CPU time are less disturbed by
    # other work than the medians; the median wall-time ratio is the result.
    fastest = {name: min(w for w, _ in values) for name, values in times.items()}
    print(f"fastest_run_ratio={fastest['transfer_lit fit'] / fastest['hand-written loop']:.3f}")
    print(f"cpu_time_ratio={cpu['transfer_lit fit'] / cpu['hand-written loop']:.3f}")
    print(f"overhead_ratio={wall['transfer_lit fit'] / wall['hand-written loop']:.3f}")


if __name__ == "__main__":
    main()
