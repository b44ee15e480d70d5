"""The ``transfer-lit`` command: LightningCLI with argument links and defaults only."""

from __future__ import annotations

import ctypes
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from transfer_lit.callbacks import CSVPredictionWriter, FaultTolerance
from transfer_lit.callbacks.fault_tolerance import EXIT_CODES, find_last_checkpoint
from transfer_lit.checkpoint_io import AtomicCheckpointIO, remove_stale_temps
from transfer_lit.data import ImageDataModule
from transfer_lit.module import TransferModule

#: Errors caused by the user's input: the CLI prints the message (no traceback) and exits with 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, TypeError, FloatingPointError, MisconfigurationException
)
#: A DataLoader worker's exception reaches the main process as "Caught <Name> in DataLoader worker process <i>.
#: Original Traceback ...", re-raised as <Name>(that text) or, when <Name> needs other arguments, RuntimeError.
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")
_WORKER_USER_ERRORS = {"BadImageError"} | {e.__name__ for e in USER_ERRORS}


def user_error_message(error: BaseException) -> str | None:
    """The one-line message to show for a user error (also one raised in a DataLoader worker), else ``None``."""
    worker = _WORKER_ERROR.match(str(error))
    if worker is not None:
        name = worker.group(1)
        original = re.search(rf"\n(?:[\w.]+\.)?{name}: (.*?)\s*\Z", str(error), re.DOTALL)
        return original.group(1) if name in _WORKER_USER_ERRORS and original else None
    if isinstance(error, USER_ERRORS):
        return str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    return None


def native_bf16() -> bool:
    """Whether the GPU computes in bf16 itself (Ampere and later), not through emulation (T4, V100: slow)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the including_emulation argument
        return torch.cuda.is_bf16_supported()


def apply_gpu_defaults(trainer: dict[str, Any], cuda: bool, bf16: bool) -> None:
    """Fill in the ``trainer`` settings a GPU run wants and the user left unset (nothing without CUDA).

    bf16 autocast (free accuracy-wise for fine-tuning, ~2x faster where the GPU has it); cuDNN benchmark mode
    (every batch has the checkpoint's crop size, so cuDNN times its kernels once and keeps the fastest);
    TF32 for what is left in float32 (a ``32-true`` run, the loss), as Lightning advises.
    """
    if not cuda:
        return
    if trainer.get("precision") is None and bf16:
        trainer["precision"] = "bf16-mixed"
    if trainer.get("benchmark") is None and not trainer.get("deterministic"):
        trainer["benchmark"] = True
    if torch.get_float32_matmul_precision() == "highest":
        torch.set_float32_matmul_precision("high")


def with_checkpoint_model(argv: list[str]) -> list[str]:
    """``argv`` with ``--model <the checkpoint's model hyperparameters>`` right after the subcommand, when
    ``--ckpt_path`` names a checkpoint file, so that whatever the command line sets comes after (and wins)."""
    commands = [i for i, arg in enumerate(argv) if arg in ("fit", "validate", "test", "predict")]
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    if path is None and "--ckpt_path" in argv[:-1]:
        path = argv[argv.index("--ckpt_path") + 1]
    if not commands or path is None or not Path(path).is_file():
        return argv
    try:  # mmap: only the hyperparameters are read, not gigabytes of weights
        hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
    except Exception:  # not a checkpoint: Lightning reports it with its own message later
        return argv
    model = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if not model or "_class_path" in hparams:  # saved outside this CLI's model class
        return argv
    try:
        encoded = json.dumps(model)
    except (TypeError, ValueError):  # an object jsonargparse could not read back either
        return argv
    at = commands[0] + 1
    return [*argv[:at], "--model", encoded, *argv[at:]]


class TransferCLI(LightningCLI):
    """LightningCLI for :class:`TransferModule` and :class:`ImageDataModule`.

    The number and names of the classes flow from the data to the model; the preprocessing flows
    from the backbone's weights to the data at run time (``ImageDataModule.resolved_preprocessing``).
    """

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI, but a ``--ckpt_path`` file supplies the model's required arguments (``model.backbone``):
        ``predict --ckpt_path X --data.predict_root Y`` needs no recipe. LightningCLI applies the checkpoint's
        hyperparameters over the parsed config afterwards, but only once the required ones were given."""
        if args is not None and not isinstance(args, list):  # a dict or a Namespace: nothing to extend
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        self.config = parser.parse_args(with_checkpoint_model(argv))

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", compute_fn=self._or_checkpoint("num_classes"),
                              apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", compute_fn=self._or_checkpoint("class_names"),
                              apply_on="instantiate")
        parser.add_lightning_class_args(CSVPredictionWriter, "prediction_writer")

    def _or_checkpoint(self, key: str) -> Callable[[Any], Any]:
        """Link value: the data's classes, or the ``--ckpt_path`` checkpoint's when the data has none
        (``predict`` with only ``data.predict_root``)."""
        return lambda value: value or getattr(self, "_checkpoint_classes", {}).get(key) or value

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # LightningCLI has read the hyperparameters of --ckpt_path (if any) into the model's config.
        self._checkpoint_classes = {k: config["model"].get(k) for k in ("num_classes", "class_names")}
        trainer = config["trainer"]
        cuda = torch.cuda.is_available()
        apply_gpu_defaults(trainer, cuda, cuda and native_bf16())
        # Default callbacks are always appended; drop those Lightning refuses when the user switched off what they need.
        unwanted: list[type] = [LearningRateMonitor] if trainer.get("logger") is False else []
        unwanted += [ModelCheckpoint] if trainer.get("enable_checkpointing") is False else []
        callbacks = self.trainer_defaults.get("callbacks", [])
        self.trainer_defaults["callbacks"] = [c for c in callbacks if not isinstance(c, tuple(unwanted))]

    def _resolve_last_checkpoint(self) -> None:
        # Lightning looks for "last" only in this run's new (empty) logger version folder; look in earlier ones.
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last" and (found := find_last_checkpoint(self.trainer)) is not None:
            print(f"transfer-lit: --ckpt_path last = {found}", file=sys.stderr)
            config["ckpt_path"] = str(found)
            for temp in remove_stale_temps(found.parent):
                print(f"transfer-lit: removed {temp.name}, the partial write of a killed process", file=sys.stderr)

    def before_fit(self) -> None:
        self._resolve_last_checkpoint()

    def after_fit(self) -> None:
        """Print the last validation metrics and where the checkpoints are, without needing the progress bar."""
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val_")}
        if metrics:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            print(f"transfer-lit: validation after epoch {self.trainer.current_epoch - 1}: {shown}")
        best_path = getattr(self.trainer.checkpoint_callback, "best_model_path", None)
        if best_path:
            print(f"transfer-lit: best checkpoint {best_path}")

    def before_validate(self) -> None:
        self._resolve_last_checkpoint()

    def before_test(self) -> None:
        self._resolve_last_checkpoint()

    def before_predict(self) -> None:
        self._resolve_last_checkpoint()


def _resume_command(argv: list[str], checkpoint: str) -> str:
    """``argv`` as a ``transfer-lit`` command line with ``--ckpt_path`` set to ``checkpoint``."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        kept.append(arg)
    return shlex.join(["transfer-lit", *kept, "--ckpt_path", checkpoint])


def _keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS (this process only; the CLI owns it).

    glibc serves every allocation over 32 MB with a fresh ``mmap`` and unmaps it on free, so on CPU each
    batch page-faults its activations in again: a MobileNetV2 forward pass at batch 50 took 0.9M page
    faults and 3.5 s of system time (next to 3.8 s of compute) on a 2-core box; kept in the heap, freed
    memory is reused (0.4M faults, 1.2 s), like a GPU caching allocator reuses its blocks. The price is a
    higher peak RSS (1.4 -> 1.9 GB there), as the heap fragments. A no-op outside glibc.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-served blocks
        libc.mallopt(-1, 1 << 40)  # M_TRIM_THRESHOLD: never trim the heap top
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        pass


def main(args: list[str] | None = None) -> None:
    """Entry point of ``transfer-lit`` and ``python -m transfer_lit``.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``). ``--debug`` shows full tracebacks.
    """
    _keep_freed_memory()
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    fault_tolerance = FaultTolerance()
    try:
        TransferCLI(
            TransferModule,
            ImageDataModule,
            # None when argv is the command line itself: LightningCLI warns when given both.
            args=None if argv == sys.argv[1:] else argv,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [
                    ModelCheckpoint(monitor="val_acc", mode="max", filename="best-{epoch}-{val_acc:.4f}"),
                    # last.ckpt after every epoch: since Lightning 2.6, save_last=True on a monitoring
                    # ModelCheckpoint only refreshes it when the monitored metric improves.
                    ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
                    LearningRateMonitor(logging_interval="epoch"),
                    fault_tolerance,
                ],
                # Every checkpoint write goes to a temp file + fsync + os.replace: a kill never corrupts last.ckpt.
                "plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}],
            },
        )
    except (KeyboardInterrupt, SystemExit) as stop:
        # SIGTERM / first Ctrl-C: FaultTolerance saved a checkpoint and set the exit code (143 / 130).
        # Second Ctrl-C: Lightning exits with 1 from its KeyboardInterrupt handler; report 130 as shells do.
        signal_name = fault_tolerance.interrupted_by
        if signal_name is None and isinstance(stop, SystemExit) and not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        signal_name = signal_name or "SIGINT"
        if fault_tolerance.checkpoint_path is not None:
            resume = _resume_command(argv, str(fault_tolerance.checkpoint_path))
            print(f"transfer-lit: {signal_name}: training stopped and saved; resume with:\n  {resume}", file=sys.stderr)
        else:
            print(f"transfer-lit: {signal_name}: stopped without saving a new checkpoint (to resume a fit from the "
                  "last one: --ckpt_path last)", file=sys.stderr)
        sys.exit(EXIT_CODES[signal_name])
    except Exception as error:
        message = user_error_message(error)
        if debug or message is None:
            raise
        print(f"transfer-lit: error: {message}\n(run with --debug for the full traceback)", file=sys.stderr)
        sys.exit(2)
