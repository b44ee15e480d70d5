"""GPU training throughput: transfer_lit's Trainer path vs hand-written PyTorch loops, in one run.

For each model (ResNet-50 and ViT-B/16 at 224 px, batch 256, bf16 autocast, synthetic data already
on the GPU, random init since throughput does not depend on weight values) and each mode:

* ``finetune``      everything trained;
* ``linear_probe``  backbone frozen (forward under no_grad, eval mode), head trained;
* ``progressive``   a mid-way phase: the input-side half of the backbone blocks frozen;

it measures images/s over ``--steps`` steps after ``--warmup`` steps, and peak GPU memory, for

* ``transfer_lit``       Lightning ``Trainer.fit`` on a ``TransferModule`` with the package's defaults (it
                         picks channels_last for conv nets on CUDA itself), timed between steps by a callback;
* ``transfer_lit_compile`` the same with ``TransferModule(compile=True)`` (``torch.compile`` of the backbone);
* ``transfer_lit_no_check_finite`` (diagnostic) the same with ``check_finite=False``: what the deferred
  (asynchronous) finiteness check still costs;
* ``hand_eager``         plain loop, default memory format;
* ``hand_eager_cl``      plain loop, channels_last (conv nets only);
* ``hand_compile_cl``    plain loop, ``torch.compile``, channels_last for conv nets;
* ``hand_frozen``        (linear_probe) backbone forward under no_grad, only the head trained;
* ``hand_half_frozen``   (progressive) the same blocks frozen as transfer_lit's, requires_grad off.

Targets (printed as ratios): finetune >= 0.95x the best hand-written finetune loop; linear_probe
>= 0.95x the frozen hand loop; progressive (half frozen) clearly cheaper than finetune (>= 1.1x
its throughput). Every configuration is isolated (an error is printed and the run goes on), compile
rows run last, and a global ``--budget-s`` skips what would not fit. The LAST line is one JSON object.

    python benchmarks/gpu_throughput.py --json-out $OUT/gpu_throughput.json  # 159 s on an H100 (2026-11-26)
    python benchmarks/gpu_throughput.py --models vit_b_16 --compile-models vit_b_16 --budget-s 400  # 101 s there
    python benchmarks/gpu_throughput.py --no-compile    # GPU, eager rows only (~1.5 min)
    python benchmarks/gpu_throughput.py --tiny          # CPU smoke test: resnet18, 32 px, batch 4

Needs only torch, torchvision, lightning and torchmetrics (not jsonargparse): it imports
transfer_lit from this checkout when the package is not installed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import itertools
import json
import logging
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("transfer_lit") is None:  # a GPU box with only torch/torchvision/lightning/torchmetrics
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

from transfer_lit import TorchvisionBackbone, TransferModule  # noqa: E402

MODES = ("finetune", "linear_probe", "progressive")
TARGETS = {"finetune_vs_best_hand": 0.95, "linear_probe_vs_hand_frozen": 0.95, "progressive_vs_finetune": 1.10}
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def is_convnet(name: str) -> bool:
    return not name.startswith(("vit_", "swin_", "maxvit"))


def half_frozen_blocks(backbone: TorchvisionBackbone) -> list[str]:
    """The input-side half (rounded down) of the backbone's blocks: a mid-way progressive phase."""
    names = backbone.block_names()
    return names[: len(names) // 2]


class Synthetic:
    """The same on-device batch, ``length`` times: no input pipeline in the measurement."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.length):
            yield self.x, self.y

    def __len__(self) -> int:
        return self.length


class WindowTimer(Callback):
    """Synchronised wall time at the start of batches ``marks[:-1]`` and after batch ``marks[-1] - 1``:
    ``durations`` has one entry per window between consecutive marks, once all of them were reached."""

    def __init__(self, marks: list[int], sync: Callable[[], None]) -> None:
        self.marks, self.sync = marks, sync
        self.times: list[float] = []

    @property
    def durations(self) -> list[float]:
        if len(self.times) != len(self.marks):
            return []
        return [b - a for a, b in itertools.pairwise(self.times)]

    def _mark(self) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def on_train_batch_start(self, trainer: Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx in self.marks[:-1]:
            self._mark()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.marks[-1] - 1:
            self._mark()


class ConfigTimeout(Exception):
    """One configuration ran past ``--config-timeout-s``."""


class time_limit(AbstractContextManager):
    """SIGALRM-based limit for one configuration (a stuck compile must not eat the whole budget)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.enabled = seconds > 0 and hasattr(signal, "SIGALRM")

    def __enter__(self) -> time_limit:
        if self.enabled:
            def _raise(signum: int, frame: Any) -> None:
                raise ConfigTimeout(f"configuration exceeded {self.seconds} s (--config-timeout-s)")

            signal.signal(signal.SIGALRM, _raise)
            signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.alarm(0)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"

    # ------------------------------------------------------------- helpers

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self) -> AbstractContextManager:
        if self.args.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One synthetic batch on the device, in the default (NCHW-contiguous) memory format."""
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(self.args.batch_size, 3, self.args.image_size, self.args.image_size, generator=g)
        y = torch.randint(0, self.args.num_classes, (self.args.batch_size,), generator=g)
        return x.to(self.device), y.to(self.device)

    def images_per_s(self, seconds: float | None) -> float:
        if not seconds:
            raise RuntimeError("the timed steps did not complete")
        value = self.args.batch_size * self.args.steps / seconds
        return round(value, 1) if value >= 10 else round(value, 4)

    def backbone(self, name: str) -> TorchvisionBackbone:
        torch.manual_seed(0)
        return TorchvisionBackbone(name, None)  # random init: throughput does not depend on weight values

    # ------------------------------------------------------------- hand-written loops

    def hand(self, name: str, mode: str, channels_last: bool, compile_: bool) -> dict[str, Any]:
        """Plain PyTorch: AdamW, bf16 autocast, ``zero_grad(set_to_none=True)``, no framework.

        With ``channels_last`` the weights are converted once and each batch in the step, as a tuned
        loop does. The model is the same backbone class + ``nn.Linear`` head transfer_lit trains.
        """
        backbone = self.backbone(name)
        head = nn.Linear(backbone.num_features, self.args.num_classes)
        net = nn.Sequential(backbone, head).to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if mode == "linear_probe":
            backbone.requires_grad_(False)
            backbone.eval()
        elif mode == "progressive":
            frozen = set(half_frozen_blocks(backbone))
            for block, params in backbone.block_params().items():
                for _, p in params:
                    p.requires_grad_(block not in frozen)
            net.train()
            for block in frozen:  # pretrained statistics in frozen blocks, as transfer_lit's default bn_policy
                for m in backbone.block_modules(block):
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
        x, y = self.batch()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format

        if mode == "linear_probe":
            features = torch.compile(backbone) if compile_ else backbone

            def step() -> None:
                with self.autocast():
                    with torch.no_grad():
                        f = features(x.contiguous(memory_format=memory_format))
                    loss = F.cross_entropy(head(f), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            model = torch.compile(net) if compile_ else net

            def step() -> None:
                with self.autocast():
                    loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        warmup = max(self.args.warmup, 3) if compile_ else self.args.warmup
        for i in range(warmup + self.args.steps):
            if i == warmup:
                self.sync()
                start = time.perf_counter()
            step()
        self.sync()
        return {"images_per_s": self.images_per_s(time.perf_counter() - start), "channels_last": channels_last}

    # ------------------------------------------------------------- transfer_lit

    def transfer_lit(self, name: str, mode: str, compile_: bool, check_finite: bool = True) -> dict[str, Any]:
        """``Trainer.fit`` on a ``TransferModule`` for ``warmup + steps`` steps, timed by a callback.

        Everything else is the package's default: it picks channels_last for conv backbones on CUDA
        itself, and ``compile=True`` is its own ``torch.compile`` of the backbone.
        """
        backbone = self.backbone(name)
        frozen = half_frozen_blocks(backbone) if mode == "progressive" else None
        kwargs: dict[str, Any] = {"check_finite": check_finite}
        if compile_:
            if "compile" not in inspect.signature(TransferModule).parameters:
                raise RuntimeError("this TransferModule has no `compile` argument")
            kwargs["compile"] = True
        module = TransferModule(backbone, num_classes=self.args.num_classes, mode=mode, lr=1e-4, **kwargs)  # type: ignore[arg-type]
        if frozen is not None:  # the phase a ProgressiveUnfreezing schedule reaches half-way
            module.set_frozen_blocks(frozen)
        warmup = max(self.args.warmup, 3) if compile_ else self.args.warmup
        timer = WindowTimer([warmup, warmup + self.args.steps], self.sync)
        trainer = Trainer(
            accelerator="gpu" if self.cuda else "cpu",
            devices=1,
            precision="bf16-mixed" if self.args.precision == "bf16" else "32-true",
            max_steps=warmup + self.args.steps,
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        x, y = self.batch()  # default memory format, as a DataLoader delivers it
        trainer.fit(module, train_dataloaders=Synthetic(x, y, warmup + self.args.steps))
        return {"images_per_s": self.images_per_s(next(iter(timer.durations), None)),
                "channels_last": bool(module.speed.channels_last)}

    # ------------------------------------------------------------- one isolated configuration

    def measure(self, fn: Callable[[], dict[str, Any]], timeout_s: int) -> dict[str, Any]:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        record: dict[str, Any] = {}
        try:
            with time_limit(timeout_s):
                record.update(fn())
            if self.cuda:
                record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as e:  # one broken configuration must not cost the others
            traceback.print_exc(limit=4, file=sys.stdout)
            record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if hasattr(torch, "_dynamo"):
                torch._dynamo.reset()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        return record


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """``(model, mode, path, priority)``: the eager rows of every model, then the compile pairs, then diagnostics.

    On an H100 (2026-11-26) the eager rows of both models took 88 s and each compile row 24-40 s; ``--budget-s`` cuts
    what comes last.
    """
    rows = []
    for model in args.models:
        cl = is_convnet(model)
        for mode in MODES:
            if mode == "finetune":
                rows.append((model, mode, "hand_eager", 0))
                if cl:
                    rows.append((model, mode, "hand_eager_cl", 0))
            else:
                rows.append((model, mode, "hand_frozen" if mode == "linear_probe" else "hand_half_frozen", 0))
            rows.append((model, mode, "transfer_lit", 0))
        # Diagnostic: the finiteness check copies the loss to the host asynchronously each step.
        rows.append((model, "finetune", "transfer_lit_no_check_finite", 2))
    for model in args.compile_models:
        rows.append((model, "finetune", "hand_compile_cl" if is_convnet(model) else "hand_compile", 1))
        rows.append((model, "finetune", "transfer_lit_compile", 1))
    return sorted(rows, key=lambda r: r[3])


def run_one(bench: Bench, model: str, mode: str, path: str) -> dict[str, Any]:
    if path == "transfer_lit":
        return bench.transfer_lit(model, mode, compile_=False)
    if path == "transfer_lit_no_check_finite":
        return bench.transfer_lit(model, mode, compile_=False, check_finite=False)
    if path == "transfer_lit_compile":
        return bench.transfer_lit(model, mode, compile_=True)
    channels_last = path.endswith("_cl") or (path in ("hand_frozen", "hand_half_frozen") and is_convnet(model))
    return bench.hand(model, mode, channels_last=channels_last, compile_="compile" in path)


def ratios(results: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, float | None]:
    def ips(model: str, mode: str, path: str) -> float | None:
        return results.get(model, {}).get(mode, {}).get(path, {}).get("images_per_s")

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    out: dict[str, float | None] = {}
    for model, modes in results.items():
        finetune = modes.get("finetune", {})
        hand_ft = [r["images_per_s"] for p, r in finetune.items() if p.startswith("hand") and "images_per_s" in r]
        tl_ft = ips(model, "finetune", "transfer_lit")
        # Compiled transfer_lit counts only against a compiled hand loop of the same run (not against eager ones).
        hand_compiled = any("compile" in p for p, r in finetune.items() if p.startswith("hand") and "images_per_s" in r)
        tl_compiled = ips(model, "finetune", "transfer_lit_compile") if hand_compiled else None
        tl_best = max(filter(None, [tl_ft, tl_compiled]), default=None)
        out[f"{model}.finetune_vs_best_hand"] = div(tl_best, max(hand_ft, default=None))
        out[f"{model}.finetune_eager_vs_hand_eager_cl"] = div(
            tl_ft, ips(model, "finetune", "hand_eager_cl" if is_convnet(model) else "hand_eager")
        )
        out[f"{model}.linear_probe_vs_hand_frozen"] = div(
            ips(model, "linear_probe", "transfer_lit"), ips(model, "linear_probe", "hand_frozen")
        )
        out[f"{model}.progressive_vs_finetune"] = div(ips(model, "progressive", "transfer_lit"), tl_ft)
        out[f"{model}.progressive_vs_hand_half_frozen"] = div(
            ips(model, "progressive", "transfer_lit"), ips(model, "progressive", "hand_half_frozen")
        )
    return out


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'model':<12}{'mode':<14}{'path':<22}{'images/s':>10}{'peak GiB':>10}", flush=True)
    for model, modes in results.items():
        for mode, paths in modes.items():
            for path, r in paths.items():
                value = f"{r['images_per_s']:>10.1f}" if "images_per_s" in r else f"{'-':>10}"
                mem = f"{r['peak_mem_gib']:>10.2f}" if "peak_mem_gib" in r else f"{'-':>10}"
                note = f"  {r.get('error') or r.get('skipped', '')}" if ("error" in r or "skipped" in r) else ""
                print(f"{model:<12}{mode:<14}{path:<22}{value}{mem}{note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: resnet18, 32 px, batch 4, 1+2 steps")
    parser.add_argument("--models", default="resnet50,vit_b_16", help="comma-separated torchvision names")
    parser.add_argument("--compile-models", default="resnet50", help="models that get the torch.compile rows")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile row")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=("bf16", "32"), default=None, help="default: bf16 on GPU, 32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip rows that would end past this many seconds (default: 240 on GPU, none on CPU)")
    parser.add_argument("--compile-cost-s", type=float, default=75.0, help="time a compile row is assumed to take")
    parser.add_argument("--config-timeout-s", type=int, default=120, help="hard limit per row, 0 = none (SIGALRM)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here after every row")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.compile_models = "resnet18", ""
        # This small: the 2-core dev boxes run ResNet-18 at ~1 GFLOP/s, and the test suite runs this.
        args.batch_size, args.image_size, args.warmup, args.steps = 4, 32, 1, 2
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # CPUs without native bf16 run bf16 autocast orders of magnitude slower: it would measure nothing useful.
    args.precision = args.precision or ("bf16" if torch.device(args.device).type == "cuda" else "32")
    if args.budget_s is None:
        args.budget_s = 240.0 if torch.device(args.device).type == "cuda" else float("inf")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.compile_models = [] if args.no_compile else [m.strip() for m in args.compile_models.split(",") if m.strip()]
    unknown = sorted(set(args.compile_models) - set(args.models))
    if unknown:
        parser.error(f"--compile-models {unknown} are not in --models {args.models}")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def build_summary(args: argparse.Namespace, bench: Bench, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": device_name(bench.device),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "precision": args.precision,
        "results": results,
        "ratios": ratios(results),
        "targets": TARGETS,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.backends.cudnn.benchmark = True  # for every path alike
    bench = Bench(args)
    log(f"gpu_throughput on {device_name(bench.device)}: torch {torch.__version__}, lightning {pl.__version__}, "
        f"models {args.models}, batch {args.batch_size}, {args.image_size} px, {args.precision}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, compile {args.compile_models or 'off'}")
    results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for model, mode, path, _ in plan(args):
        spent = time.perf_counter() - START
        # The hand-compiled row is only worth its time if transfer_lit's compiled row can follow it.
        cost = args.compile_cost_s * (2 if path.startswith("hand_compile") else 1) if "compile" in path else 0.0
        slot = results.setdefault(model, {}).setdefault(mode, {})
        if spent + cost > args.budget_s:
            slot[path] = {"skipped": f"budget: {spent:.0f}s spent + ~{cost:.0f}s > --budget-s {args.budget_s:.0f}"}
            log(f"{model} {mode} {path}: skipped ({slot[path]['skipped']})")
            continue
        log(f"{model} {mode} {path} ...")
        slot[path] = bench.measure(lambda: run_one(bench, model, mode, path), args.config_timeout_s)  # noqa: B023
        slot[path]["seconds"] = round(time.perf_counter() - START - spent, 1)
        log(f"{model} {mode} {path}: {slot[path]}")
        summary = build_summary(args, bench, results)
        if args.json_out is not None:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(summary, indent=1))
    summary = build_summary(args, bench, results)
    print_table(results)
    print("\nratios (target):", flush=True)
    for key, value in summary["ratios"].items():
        target = TARGETS.get(key.split(".", 1)[1])
        verdict = "" if target is None or value is None else ("  ok" if value >= target else "  BELOW TARGET")
        shown = "-" if value is None else value
        print(f"  {key:<45} {shown:>7}  ({'>= ' + str(target) if target else 'info'}){verdict}")
    log("done")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
