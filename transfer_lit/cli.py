"""The ``transfer-lit`` command: LightningCLI with argument links and defaults only.

What the defaults do lives elsewhere: checkpoints (:mod:`transfer_lit.checkpoints`), performance
(:mod:`transfer_lit.speed`), what counts as a user error (:mod:`transfer_lit.errors`), stopping on a
signal (:class:`~transfer_lit.FaultTolerance`). Nothing in the package imports this module.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from transfer_lit.callbacks import CSVPredictionWriter, EpochSummary, FaultTolerance, ProgressiveUnfreezing
from transfer_lit.callbacks.epoch_summary import validation_summary
from transfer_lit.callbacks.fault_tolerance import EXIT_CODES
from transfer_lit.callbacks.learning_rates import LearningRates
from transfer_lit.checkpoints import (
    AtomicCheckpointIO,
    check_config_files,
    load_torch_file,
    resolve_last_checkpoint,
    resume_command,
    with_checkpoint_model,
)
from transfer_lit.checkpoints.resume import continue_run
from transfer_lit.cli_config import TransferArgumentParser, parse_as_run, show_the_head_lr
from transfer_lit.compare import main as compare_main
from transfer_lit.console import progress_bar, quiet_lightning
from transfer_lit.data.stages import evaluated_data
from transfer_lit.errors import unwrapped, user_error_message
from transfer_lit.loggers import DEFAULT_ROOT_DIR, resolve_loggers, with_logger_save_dir
from transfer_lit.module import TransferModule
from transfer_lit.speed import apply_gpu_defaults, keep_freed_memory, native_bf16, prefer_tf32

DESCRIPTION = ("transfer-lit: transfer learning with PyTorch Lightning (linear probe, fine-tune, progressive "
               "unfreezing) for images and text; `transfer-lit compare --help`: which strategy wins on your data. "
               "Add --debug to any command for full tracebacks of errors; --version prints the version. Recipes: "
               "configs/README.md.")

#: The data module of each modality: ``--data`` defaults to images; a text checkpoint's ``predict`` to text.
DATA_CLASSES = {"image": "transfer_lit.ImageDataModule", "text": "transfer_lit.TextDataModule"}


class TransferCLI(LightningCLI):
    """LightningCLI for transfer learning: ``TransferCLI(args=[...])`` is ``transfer-lit`` itself.

    With no classes given, the model and the data module are chosen in subclass mode (``--model
    myresearch.FocalTransferModule``, ``--data transfer_lit.TextDataModule``), defaulting to
    :class:`TransferModule` and :class:`ImageDataModule` when a recipe names none; ``--model.help CLASS`` and
    ``--data.help CLASS`` list their options. Explicit classes keep LightningCLI's behaviour for them. Either way
    the trainer gets transfer_lit's defaults (:meth:`default_callbacks`, atomic checkpoint writes), as does a
    subclass of this class; a ``trainer_defaults`` argument adds to and overrides them key by key.

    The number and names of the classes flow from the data to the model; the preprocessing flows
    from the backbone's weights to the data at run time (``resolved_preprocessing`` of the data modules).

    Where things go without ``--trainer.default_root_dir``: ``fit`` logs, checkpoints and saves ``config.yaml`` in
    ``lightning_logs/version_N/`` of the working directory; ``validate`` / ``test`` in a new version folder beside the
    one that trained the checkpoint they evaluate (the test report beside the checkpoint); ``predict`` writes only
    ``prediction_writer.output``: no version folder, no ``config.yaml`` (:mod:`transfer_lit.loggers`).
    """

    def __init__(self, model_class: Any = None, datamodule_class: Any = None, *,
                 fault_tolerance: FaultTolerance | None = None, **kwargs: Any) -> None:
        if model_class is None:
            model_class = TransferModule
            kwargs.setdefault("subclass_mode_model", True)
        if datamodule_class is None:
            datamodule_class = LightningDataModule
            kwargs.setdefault("subclass_mode_data", True)
        defaults = {"callbacks": self.default_callbacks(fault_tolerance or FaultTolerance()),
                    # metrics.csv whatever is installed (Lightning's own default is TensorBoard when it can import it)
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": DEFAULT_ROOT_DIR}},
                    # Every checkpoint write goes to a temp file + fsync + os.replace: a kill never corrupts last.ckpt.
                    "plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}]}
        kwargs["trainer_defaults"] = {**defaults, **(kwargs.get("trainer_defaults") or {})}
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        kwargs.setdefault("parser_class", TransferArgumentParser)
        super().__init__(model_class, datamodule_class, **kwargs)

    @staticmethod
    def default_callbacks(fault_tolerance: FaultTolerance) -> list[Callback]:
        """The best and last checkpoints, the learning rates (LearningRates), a line per epoch, stopping on a signal."""
        return [
            ModelCheckpoint(monitor="val_acc", mode="max", filename="best-{epoch}-{val_acc:.4f}"),
            # last.ckpt after every epoch: since Lightning 2.6, save_last=True on a monitoring
            # ModelCheckpoint only refreshes it when the monitored metric improves.
            ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
            LearningRates(logging_interval="epoch"),
            EpochSummary(),
            fault_tolerance,
        ]

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI, but a ``--ckpt_path`` file supplies the model's required arguments (``model.backbone``):
        ``predict --ckpt_path X --data.predict_root Y`` needs no recipe. LightningCLI applies the checkpoint's
        hyperparameters over the parsed config afterwards, but only once the required ones were given. A logger named
        without ``save_dir`` (``--trainer.logger TensorBoardLogger``) writes under ``trainer.default_root_dir``."""
        if args is not None and not isinstance(args, list):  # a dict or a Namespace: nothing to extend
            return super().parse_arguments(parser, args)
        argv = with_logger_save_dir(list(sys.argv[1:] if args is None else args))
        check_config_files(argv)
        data_classes = DATA_CLASSES if self.subclass_mode_data else None
        self.config = parse_as_run(parser, with_checkpoint_model(argv, data_classes, self.subclass_mode_model))

    @override
    def _parse_ckpt_path(self) -> None:
        """In subclass mode :meth:`parse_arguments` already put the checkpoint's class and hyperparameters first on
        the command line (so the user's options win); LightningCLI's own pass would re-apply them as ``dict_kwargs``,
        which jsonargparse refuses for nested classes (``model.dict_kwargs.backbone.init_args.name``)."""
        if self.subclass_mode_model or not self.config.get("subcommand"):
            return
        # LightningCLI's own pass for explicit model classes, without a `_class_path` (a checkpoint written by
        # `transfer-lit`, in subclass mode): the checkpoint's hyperparameters over the parsed config.
        path = self.config[self.config.subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        loaded = load_torch_file(path, "--ckpt_path", mmap=True)
        hparams = dict((loaded.get("hyper_parameters") if isinstance(loaded, dict) else None) or {})
        for key in ("_instantiator", "_class_path"):
            hparams.pop(key, None)
        if hparams:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        model = "model.init_args" if self.subclass_mode_model else "model"
        for key in ("num_classes", "class_names"):
            parser.link_arguments(f"data.{key}", f"{model}.{key}", compute_fn=self._or_checkpoint(key),
                                  apply_on="instantiate")
        parser.add_lightning_class_args(CSVPredictionWriter, "prediction_writer")
        parser.add_argument("--print_schedule", action="store_true",
                            help="fit: print the ProgressiveUnfreezing phases as a table and YAML, then exit")
        if self.subclass_mode_data:  # `--data` picks the data module; images when the recipe names none
            parser.set_defaults({"data": {"class_path": DATA_CLASSES["image"]}})
        if self.subclass_mode_model:
            parser.set_defaults({"model": {"class_path": "transfer_lit.TransferModule"}})

    def _or_checkpoint(self, key: str) -> Callable[[Any], Any]:
        """Link value: the data's classes, or the ``--ckpt_path`` checkpoint's when the data has none
        (``predict`` with only ``data.predict_root``)."""
        return lambda value: value or getattr(self, "_checkpoint_classes", {}).get(key) or value

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # LightningCLI has read the hyperparameters of --ckpt_path (if any) into the model's config.
        model = config["model"].get("init_args", config["model"]) if self.subclass_mode_model else config["model"]
        self._checkpoint_classes = {k: model.get(k) for k in ("num_classes", "class_names")}
        # With the checkpoint's classes, validate / test / predict need only the data they evaluate.
        evaluated_data(config.get("data"), self.subcommand, model.get("class_names") or model.get("num_classes"),
                       self.datamodule_class)
        for key in ("optimizer", "lr_scheduler"):  # LightningCLI's own: one group over every parameter
            chosen = config.get(key)
            if chosen:
                name = getattr(chosen, "class_path", chosen)
                raise ValueError(
                    f"--{key} {name} would replace transfer_lit's parameter groups (head, backbone.<block>, their "
                    f"no_decay twins) and their learning rates with one group; give it to the model instead: "
                    f"--model.{key} {name} (learning rates come from model.lr, model.backbone_lr_mult and "
                    f"model.layer_decay)")
        show_the_head_lr(model)
        trainer = config["trainer"]
        resolve_loggers(trainer, self.subcommand, config.get("ckpt_path"))
        if self.subcommand == "predict":  # it logs no metrics; its checkpoint holds the configuration
            self.save_config_callback = None
        cuda = torch.cuda.is_available()
        apply_gpu_defaults(trainer, cuda, cuda and native_bf16())
        if trainer.get("sync_batchnorm") and (trainer.get("accelerator") == "cpu" or not cuda):
            print("transfer-lit: trainer.sync_batchnorm=true is for GPUs (torch's SyncBatchNorm refuses CPU tensors): "
                  "off for this CPU run", file=sys.stderr)
            trainer["sync_batchnorm"] = False
        prefer_tf32(cuda)  # main() restores the process-wide setting when the command is done
        if self.subcommand == "fit" and trainer.get("max_epochs") == -1 and trainer.get("max_steps") in (-1, None) \
                and not trainer.get("max_time"):
            print("transfer-lit: trainer.max_epochs=-1 and no max_steps / max_time: training runs until stopped "
                  "(Ctrl-C or SIGTERM saves a checkpoint to resume from)", file=sys.stderr)
        # Default callbacks are always appended; drop those Lightning refuses when the user switched off what they need.
        unwanted: list[type] = [LearningRates] if trainer.get("logger") is False else []
        unwanted += [ModelCheckpoint] if trainer.get("enable_checkpointing") is False else []
        callbacks = [c for c in self.trainer_defaults.get("callbacks", []) if not isinstance(c, tuple(unwanted))]
        self.trainer_defaults["callbacks"] = callbacks + [bar for bar in [progress_bar(trainer)] if bar is not None]

    def before_fit(self) -> None:
        if self.config_init[self.subcommand].get("print_schedule"):
            unfreezing = [c for c in getattr(self.trainer, "callbacks", []) if isinstance(c, ProgressiveUnfreezing)]
            if not unfreezing:
                raise ValueError("--print_schedule: the recipe has no transfer_lit.ProgressiveUnfreezing callback")
            for callback in unfreezing:
                print(callback.plan(self.model) + "\n\n# give it back with --config (edit the blocks):\n"
                      + callback.schedule_yaml())
            sys.exit(0)
        resolve_last_checkpoint(self.trainer, self.config_init[self.subcommand], self.subcommand)
        continue_run(self.trainer, self.config_init[self.subcommand].get("ckpt_path"))  # in the checkpoint's folder

    def after_fit(self) -> None:
        """Print the last validation metrics and where the checkpoints are, without needing the progress bar."""
        if not self.trainer.is_global_zero:
            return
        shown = validation_summary(self.trainer)
        if shown:
            print(f"transfer-lit: validation after epoch {self.trainer.current_epoch - 1}: {shown}")
        best_path = getattr(self.trainer.checkpoint_callback, "best_model_path", None)
        if best_path:
            print(f"transfer-lit: best checkpoint {best_path}")

    def before_validate(self) -> None:
        resolve_last_checkpoint(self.trainer, self.config_init[self.subcommand], self.subcommand)

    before_test = before_validate

    def before_predict(self) -> None:
        self.before_validate()
        self.trainer.loggers = []  # it found `--ckpt_path last`; it would write hparams.yaml into a new version folder


def build_cli(args: list[str] | None, fault_tolerance: FaultTolerance | None = None, run: bool = True) -> TransferCLI:
    """The ``transfer-lit`` CLI run on ``args`` (``main`` adds error reporting and signal handling; benchmarks and
    notebooks use this to keep the objects)."""
    return TransferCLI(args=args, run=run, fault_tolerance=fault_tolerance)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``transfer-lit`` and ``python -m transfer_lit``.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``). ``--debug`` shows full tracebacks.
    """
    keep_freed_memory()
    argv = list(sys.argv[1:] if args is None else args)
    if argv == ["--version"]:
        print(f"transfer-lit {version('transfer-lit')} (lightning {version('lightning')}, torch {torch.__version__})")
        return
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    fault_tolerance = FaultTolerance()
    restore_tf32 = prefer_tf32(False)  # the CLI may switch TF32 on for CUDA: put the process setting back after
    subcommand = next((a for a in argv if a in ("fit", "validate", "test", "predict")), None)
    try:
        with quiet_lightning(subcommand):
            if argv[:1] == ["compare"]:  # not a Trainer method: its own parser, one fit per strategy and seed
                compare_main(argv[1:])
            else:  # args None when argv is the command line itself: LightningCLI warns when given both
                TransferCLI(args=None if argv == sys.argv[1:] else argv, fault_tolerance=fault_tolerance)
    except (KeyboardInterrupt, SystemExit) as stop:
        # SIGTERM / first Ctrl-C: FaultTolerance saved a checkpoint and set the exit code (143 / 130).
        # Second Ctrl-C: Lightning exits with 1 from its KeyboardInterrupt handler; report 130 as shells do.
        signal_name = fault_tolerance.interrupted_by
        if signal_name is None and isinstance(stop, SystemExit) and not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        signal_name = signal_name or "SIGINT"
        if fault_tolerance.checkpoint_path is not None:
            resume = resume_command(argv, str(fault_tolerance.checkpoint_path))
            print(f"transfer-lit: {signal_name}: training stopped and saved; resume with:\n  {resume}", file=sys.stderr)
        else:
            print(f"transfer-lit: {signal_name}: stopped without saving a new checkpoint (to resume a fit from the "
                  "last one: --ckpt_path last)", file=sys.stderr)
        if args is None:  # the command itself: a late copy of the signal (other ranks, srun) must not cut the exit
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)
        sys.exit(EXIT_CODES[signal_name])
    except Exception as raised:
        error = unwrapped(raised)  # what the data module raised, not jsonargparse's wrapper around it
        message = user_error_message(error)
        if (debug or message is None) and error is raised:
            raise
        if debug or message is None:
            raise error from None
        print(f"transfer-lit: error: {message}\n(run with --debug for the full traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        restore_tf32()
