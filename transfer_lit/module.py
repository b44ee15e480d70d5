"""TransferModule: a pretrained backbone plus a new head, trained as a linear probe, fine-tuned, or
progressively unfrozen. It owns the model, the shared step and the metrics; freezing under each strategy
(:mod:`transfer_lit.freezing`), the optimizer recipe (:mod:`transfer_lit.param_groups`), speed defaults
(:mod:`transfer_lit.speed`) and checkpoint state (:mod:`transfer_lit.checkpoints`) are objects it holds.
A batch is ``(inputs, target)``, ``inputs`` a tensor or a mapping of tensors (any modality).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from transfer_lit.backbones.base import as_backbone
from transfer_lit.checkpoints.hparams import given_hparams
from transfer_lit.checkpoints.state import restore_transfer_state, save_transfer_state
from transfer_lit.evaluation.decision import Calibration, Decision
from transfer_lit.evaluation.hooks import EvaluationHooks
from transfer_lit.finite_check import FiniteCheck
from transfer_lit.freezing import BNPolicy, FreezingHooks, FreezingStrategy, FrozenBlocks, build_freezing
from transfer_lit.freezing.blocks import Mode, check_modes
from transfer_lit.heads import HeadFactory, LinearHead
from transfer_lit.losses import class_probabilities, classification_loss
from transfer_lit.metrics import StageMetrics, Task, check_task
from transfer_lit.param_groups import LearningRatePolicy, OptimizerRecipe, run_length
from transfer_lit.preprocessing import Preprocessing, resolve_preprocessing
from transfer_lit.protocols import CachedFeatures
from transfer_lit.speed import BackboneSpeed


class TransferModule(LightningModule):
    """Backbone + new head for classification transfer learning.

    Args:
        backbone: a :class:`~transfer_lit.Backbone` (e.g. ``TorchvisionBackbone``), or any ``nn.Module`` with a
            ``num_features`` attribute that maps a batch's inputs to ``(batch, num_features)``.
        num_classes: classes (``multiclass``; ``binary`` needs 2) or labels (``multilabel``); the CLI reads the data.
        task: ``multiclass``, ``binary`` or ``multilabel``.
        mode: ``linear_probe`` (backbone frozen, run in eval mode under no_grad), ``finetune`` (all
            trainable) or ``progressive`` (starts frozen; a ``ProgressiveUnfreezing`` callback thaws blocks).
        head: factory called as ``head(num_features, num_outputs)``.
        optimizer: factory called with the named parameter groups (AdamW by default).
        lr_scheduler: optional factory called with the optimizer.
        scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        scheduler_monitor: metric ReduceLROnPlateau-style schedulers watch.
        lr: learning rate of the head.
        backbone_lr_mult: backbone (output-side block) LR = ``lr * backbone_lr_mult``.
        layer_decay: each block closer to the input gets ``layer_decay`` x the LR of the next.
        weight_decay: weight decay of the decay groups; norms, biases and tokens get none.
        label_smoothing: label smoothing of the loss (0 = off).
        class_weights: per-class loss weights (length ``num_classes``), for imbalanced data.
        class_names: names of the classes, kept in the checkpoint; the CLI fills them from the data.
        bn_policy: BatchNorm of frozen blocks: ``train`` (batch statistics, running stats updated), ``train_bn``
            (that, and their affine parameters train too: Lightning's and fastai's ``train_bn=True``), ``eval``
            (pretrained statistics, kept in eval mode; default) or ``frozen`` (every backbone BatchNorm in eval
            mode with its affine parameters never trained, even once thawed).
        preprocessing: overrides (``crop_size``, ``mean``, ...) of what the backbone's weights declare (after a
            reload: what the checkpoint was trained with), which wins over the backbone's defaults.
        calibration: ``temperature``: fit a temperature to each validation epoch's logits, for ``test`` / ``predict``.
        threshold: binary tasks: ``test`` / ``predict``'s threshold on P(class 1): a number, or ``max_f1`` /
            ``recall>=0.9`` / ``precision>=0.9``, chosen on each validation epoch (both saved in checkpoints).
        check_finite: stop with a clear error at a NaN or infinite training loss (on CUDA two steps later).
        compile: ``torch.compile`` the backbone (slow first steps, one recompile per thaw; ``benchmarks/RESULTS.md``).

    On CUDA, convolutional backbones run in ``channels_last``, the default AdamW is the fused one and the training
    step is free of host syncs (``sync_free``); on CPU nothing changes (:mod:`transfer_lit.speed`).

    Research code overrides these hooks: ``batch_logits`` (a batch to logits; owns the cached-features path),
    ``forward`` / ``features``, ``loss``, ``probabilities``, ``shared_step``, ``configure_optimizers``,
    ``set_frozen_blocks`` and ``configure_freezing`` (the strategy-specific freezing object).
    """

    #: No device-to-host reads in the training step (each makes the CPU wait for the GPU): the step loss goes to the
    #: logger, not the progress bar, and ``check_finite`` reads it two steps late. ``None``: on CUDA only.
    sync_free: bool | None = None

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        task: Task = "multiclass",
        mode: Mode = "finetune",
        head: HeadFactory = LinearHead,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val_loss",
        lr: float = 1e-3,
        backbone_lr_mult: float = 0.01,
        layer_decay: float = 1.0,
        weight_decay: float = 0.01,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        class_names: list[str] | None = None,
        bn_policy: BNPolicy = "eval",
        preprocessing: dict[str, Any] | None = None,
        calibration: Calibration = "none",
        threshold: float | str = 0.5,
        check_finite: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if given_hparams() else ["backbone", "head", "optimizer", "lr_scheduler"])
        check_modes(mode, bn_policy)
        check_task(task, num_classes, class_names, class_weights, label_smoothing)
        self.backbone = as_backbone(backbone)
        self.head = head(self.backbone.num_features, 1 if task == "binary" else num_classes)
        self.task, self.mode, self.num_classes, self.bn_policy = task, mode, num_classes, bn_policy
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.policy = LearningRatePolicy(lr, backbone_lr_mult, layer_decay, weight_decay)
        self.recipe = OptimizerRecipe(optimizer, lr_scheduler, scheduler_interval, scheduler_monitor, self.policy)
        self.label_smoothing, self.check_finite = label_smoothing, check_finite
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None, persistent=False)
        self._preprocessing_override = preprocessing
        self.preprocessing: Preprocessing = self.resolve_preprocessing()
        self.speed = BackboneSpeed(compile)
        self.frozen = FrozenBlocks(self.backbone, bn_policy)
        self.lr_scale = 1.0
        self.metrics, self.decision = StageMetrics(task, num_classes), Decision(task, calibration, threshold)
        self.last_test_report = ""
        self.set_frozen_blocks(self.backbone.block_names() if mode != "finetune" else [])

    def resolve_preprocessing(self, trained_with: Preprocessing | None = None) -> Preprocessing:
        """``model.preprocessing`` > what the checkpoint was trained with, else what the weights declare > default."""
        declared = trained_with if trained_with is not None else self.backbone.preprocessing
        return resolve_preprocessing(self._preprocessing_override, declared, self.backbone.default_preprocessing())

    @property
    def frozen_blocks(self) -> set[str]:
        """Names of the backbone blocks frozen now."""
        return self.frozen.blocks

    @property
    def freezing(self) -> FreezingStrategy:
        """What freezing means under this run's strategy (chosen in ``setup`` by :meth:`configure_freezing`)."""
        return self.frozen.strategy

    def set_frozen_blocks(self, blocks: Iterable[str]) -> None:
        """Freeze exactly ``blocks`` (names from ``backbone.block_names()``), thaw the rest: grads, BN mode, LR gate."""
        self.frozen.freeze_exactly(blocks, self._optimizer())
        self.train(self.training)

    def set_block_gates(self, gates: Mapping[str, float]) -> None:
        """Learning-rate gates in ``[0, 1]`` of thawed blocks (a warm-up after a thaw); frozen blocks stay at 0."""
        self.frozen.set_gates(gates, self._optimizer())

    def _optimizer(self) -> torch.optim.Optimizer | None:
        return self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None

    def configure_freezing(self) -> FreezingStrategy:
        """The freezing strategy for this run's trainer (called once in ``setup``; override to choose one)."""
        return build_freezing(self.trainer.strategy, self.trainer.world_size)

    @override
    def train(self, mode: bool = True) -> TransferModule:
        """Lightning calls ``.train()`` every epoch; frozen BatchNorm must stay in eval mode through it."""
        super().train(mode)
        if mode:
            self.frozen.set_batchnorm_modes(whole_backbone=self.mode == "linear_probe")
        return self

    def features(self, inputs: Any) -> torch.Tensor:
        """Pooled backbone features ``(batch, num_features)``; no graph is built in linear-probe mode."""
        self.preprocessing.check_inputs(inputs)
        with torch.no_grad() if self.mode == "linear_probe" else contextlib.nullcontext():
            return self.backbone(self.speed.prepare_inputs(inputs))

    @override
    def forward(self, inputs: Any) -> torch.Tensor:
        return self.head(self.features(inputs))

    def batch_logits(self, batch: Any) -> torch.Tensor:
        """Logits of a batch ``(inputs, target-or-paths)``: the one place a batch becomes logits.

        A :class:`~transfer_lit.protocols.CachedFeatures` batch (``data.cache_features``) already holds this
        frozen backbone's features: only the head runs. Every other batch goes through ``forward``.
        """
        if isinstance(batch, CachedFeatures):
            return self.head(batch.features)
        return self(batch[0])

    def feature_cache_refusal(self) -> str | None:
        """``None`` when batches may be served from cached backbone features, else why not."""
        if self.mode != "linear_probe":
            return f"model.mode={self.mode!r} trains the backbone (only 'linear_probe' keeps it frozen)"
        if (unwrapped := self.freezing.unwrapped_refusal()) is not None:
            return unwrapped
        bypassed = [name for name in ("forward", "batch_logits")
                    if getattr(type(self), name) is not getattr(TransferModule, name)]
        if bypassed:
            return f"{type(self).__name__} overrides {' and '.join(bypassed)}, which cached features would bypass"
        return None

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (multiclass) or binary cross-entropy with logits, with smoothing and class weights."""
        return classification_loss(self.task, logits, target, self.class_weights, self.label_smoothing)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax for multiclass, sigmoid otherwise (binary: probability of class 1, shape ``(batch,)``)."""
        return class_probabilities(self.task, logits)

    def shared_step(self, batch: Any, stage: str) -> torch.Tensor | None:
        """Forward, loss and metric update for the ``train`` / ``val`` / ``test`` stages."""
        if batch is None:  # every sample of the batch was unreadable and data.bad_images='skip' left it out
            return None
        logits = self.batch_logits(batch)
        loss = self.loss(logits, batch[1])
        detached = logits.detach()
        scored = self.decision.scale(detached) if stage == "test" else detached  # val: raw, what the decision fits
        self.metrics.update(stage, self.probabilities(scored), batch[1], detached)
        # Lightning reads every progress-bar value on the host after each step: not the step loss when sync-free.
        prog_bar = stage != "train" or not self._sync_free()
        self.log(f"{stage}_loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=prog_bar,
                 batch_size=len(batch[1]))
        return loss

    def _sync_free(self) -> bool:
        return self.device.type == "cuda" if self.sync_free is None else self.sync_free

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self.shared_step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if batch is None:  # every sample of the batch was skipped (data.bad_images='skip')
            return {"paths": [], "probs": torch.empty(0, self.num_classes)}
        return {"paths": list(batch[1]), "probs": self.probabilities(self.decision.scale(self.batch_logits(batch)))}

    @override
    def on_test_epoch_end(self) -> None:
        self.last_test_report = self.metrics.test_report(self.class_names)
        if self.last_test_report and self.trainer.is_global_zero:
            print(self.last_test_report)

    @override
    def configure_callbacks(self) -> list[Callback]:
        """The freezing strategy's steps, the epoch metrics and decision fits
        (:class:`~transfer_lit.evaluation.hooks.EvaluationHooks`) and the NaN check (no override of a hook can skip
        them), each bound to this module; extend with ``super()``: ``on_fit_start`` checks they are attached."""
        if self._attached():  # a reused Trainer already holds this module's own
            return []
        return [FreezingHooks(self), EvaluationHooks(self)] + ([FiniteCheck(self, self._sync_free)] if self.check_finite
                                                               else [])

    def _attached(self) -> list[Callback]:
        callbacks: list[Callback] = getattr(self._trainer, "callbacks", [])
        return [c for c in callbacks if getattr(c, "owner", None) is self]

    @override
    def on_fit_start(self) -> None:
        if not any(isinstance(c, FreezingHooks) for c in self._attached()):
            raise RuntimeError(f"{type(self).__name__}.configure_callbacks dropped FreezingHooks: extend super()'s")

    def install_freezing(self, strategy: FreezingStrategy) -> None:
        """Freeze through ``strategy`` from now on (``FreezingHooks`` installs ``configure_freezing()`` in setup)."""
        strategy.check_mode(self.mode)
        self.frozen.strategy = strategy
        self.set_frozen_blocks(self.frozen_blocks)  # as the strategy means it (gate-only: every parameter trainable)

    @override
    def setup(self, stage: str) -> None:
        self.speed.apply(self.backbone, self.trainer.strategy.root_device, len(self.backbone.block_names()))

    @override
    def teardown(self, stage: str) -> None:
        self.speed.restore()

    @override
    def configure_optimizers(self) -> Any:
        sized = (lambda interval: run_length(self.trainer, interval)) if self._trainer is not None else None
        return self.recipe.build(self.backbone, self.head, self.device, self.frozen, lambda: self.lr_scale, sized)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_transfer_state(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_transfer_state(self, checkpoint)
