"""TransferModule: a pretrained backbone plus a new head, trained as a linear probe, fine-tuned, or
progressively unfrozen, with named parameter groups and checkpoint-matched preprocessing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from transfer_lit.backbones.base import as_backbone
from transfer_lit.checkpoint_check import check_checkpoint_fits
from transfer_lit.feature_cache import CachedFeatures
from transfer_lit.finite_check import LossWatch, NonFiniteLoss, NonFiniteLossError, diagnose
from transfer_lit.freezing import (
    BNPolicy,
    ThawedGradientSync,
    hold_gradients,
    reset_optimizer_state,
    set_batchnorm_modes,
    set_requires_grad,
)
from transfer_lit.heads import HeadFactory, LinearHead
from transfer_lit.metrics import Task, build_confusion_matrix, build_metrics, build_train_metrics, format_report
from transfer_lit.param_groups import LearningRatePolicy, build_param_groups, install_lr_gate, prefer_fused, set_gate
from transfer_lit.preprocessing import Preprocessing, resolve_preprocessing

Mode = Literal["linear_probe", "finetune", "progressive"]
_MODES = ("linear_probe", "finetune", "progressive")
_BN_POLICIES = ("train", "eval", "frozen")


def _given_hparams() -> bool:
    """True when LightningCLI passes the parsed config as hyperparameters (objects then need no ignoring)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning
        return False
    return _given_hyperparameters.get() is not None


def _convolutional(backbone: nn.Module) -> bool:
    """True when most of the backbone's parameters are in 2-D convolutions (ResNet, MobileNet; not ViT)."""
    conv = sum(p.numel() for m in backbone.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(False))
    return conv * 2 > sum(p.numel() for p in backbone.parameters())


class TransferModule(LightningModule):
    """Backbone + new head for classification transfer learning.

    Args:
        backbone: a :class:`~transfer_lit.Backbone` (e.g. ``TorchvisionBackbone``) or any ``nn.Module``
            with a ``num_features`` attribute that returns ``(batch, num_features)``.
        num_classes: classes (``multiclass``; ``binary`` needs 2) or labels (``multilabel``).
            The CLI fills it in from the data.
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
        bn_policy: BatchNorm of frozen blocks: ``train`` (batch statistics, running stats updated),
            ``eval`` (pretrained statistics, kept in eval mode; default) or ``frozen`` (every backbone
            BatchNorm in eval mode with its affine parameters never trained, even once thawed).
        preprocessing: explicit preprocessing overrides (``crop_size``, ``mean``, ...); they win over
            what the backbone's weights declare, which wins over the defaults.
        check_finite: stop with a clear error when the training loss is NaN or infinite (on CUDA two steps
            later, see ``sync_free``).
        compile: ``torch.compile`` the backbone in place (opt-in; checkpoint keys are unchanged). The first
            steps are slow while it compiles, and so are the first steps after each thaw: a thaw changes
            ``requires_grad``, which recompiles the backbone once for the new phase (the recompile limit is
            raised to leave room for one graph per phase). Measured on one H100 (bf16, batch 256): ResNet-50
            5,591 images/s compiled vs 3,964 eager, ViT-B/16 3,093 vs 2,089 (``benchmarks/RESULTS.md``).

    On CUDA, convolutional backbones (most parameters in ``Conv2d``) run in ``channels_last`` memory
    format, which is what cuDNN's fastest kernels want, the default AdamW is the fused one, and the training
    step is free of host syncs (``sync_free``); on CPU nothing changes.
    """

    #: Keep the training step free of device-to-host reads, each of which makes the CPU wait for the GPU
    #: (it cannot queue the next step meanwhile): the per-step loss goes to the logger (every
    #: ``log_every_n_steps``) but not to the progress bar, and ``check_finite`` reads the loss asynchronously
    #: (two steps late). ``None``: on CUDA only. (Training metrics never read the device: accuracy and macro
    #: precision / recall / F1 without argument checks; AUROC is computed for validation and test only.)
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
        check_finite: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        objects = ["backbone", "head", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=[] if _given_hparams() else objects)
        if mode not in _MODES:
            raise ValueError(f"model.mode must be one of {list(_MODES)}, got {mode!r}")
        if bn_policy not in _BN_POLICIES:
            raise ValueError(f"model.bn_policy must be one of {list(_BN_POLICIES)}, got {bn_policy!r}")
        if task == "binary" and num_classes != 2:
            raise ValueError(f"model.num_classes must be 2 for task 'binary', got {num_classes}")
        if num_classes < 2 and task == "multiclass":
            raise ValueError(f"model.num_classes must be >= 2 for task 'multiclass', got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names but model.num_classes={num_classes}")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"model.class_weights has {len(class_weights)} values, expected num_classes={num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.backbone = as_backbone(backbone)
        self.head = head(self.backbone.num_features, 1 if task == "binary" else num_classes)
        self.task, self.mode, self.num_classes, self.bn_policy = task, mode, num_classes, bn_policy
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.policy = LearningRatePolicy(lr, backbone_lr_mult, layer_decay, weight_decay)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.scheduler_interval, self.scheduler_monitor = scheduler_interval, scheduler_monitor
        self.label_smoothing, self.check_finite = label_smoothing, check_finite
        self.compile_blocks, self.channels_last = compile, False
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None, persistent=False)
        self.preprocessing: Preprocessing = resolve_preprocessing(preprocessing, self.backbone.preprocessing)
        self.lr_scale = 1.0
        self.frozen_blocks: set[str] = set()
        self.thawed_sync = ThawedGradientSync()
        self.loss_watch = LossWatch(deferred=False)
        self.train_metrics = build_train_metrics(task, num_classes)
        self.val_metrics = build_metrics(task, num_classes, "val")
        self.test_metrics = build_metrics(task, num_classes, "test")
        self.test_confusion = build_confusion_matrix(task, num_classes)
        self.last_test_report = ""
        self.set_frozen_blocks(self.backbone.block_names() if mode != "finetune" else [])

    # ----------------------------------------------------------------- freezing

    @property
    def gate_only(self) -> bool:
        """Sharded strategies (FSDP, DeepSpeed) cannot change ``requires_grad`` after wrapping:
        there, frozen blocks keep their gradients and are held still by a zero LR gate instead."""
        trainer = self._trainer
        return trainer is not None and isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy)

    def set_frozen_blocks(self, blocks: Iterable[str]) -> None:
        """Freeze exactly ``blocks`` (thaw every other backbone block): ``requires_grad``, BN mode, LR gate.

        Args:
            blocks: backbone block names, see ``self.backbone.block_names()``.
        """
        blocks = set(blocks)
        names = self.backbone.block_names()
        unknown = blocks - set(names)
        if unknown:
            raise KeyError(f"unknown backbone block(s) {sorted(unknown)}; valid blocks are {names}")
        thawed_now = self.frozen_blocks - blocks
        self.frozen_blocks = blocks
        set_requires_grad(self.backbone, blocks, self.gate_only, self.bn_policy)
        if self._trainer is not None and self.trainer.optimizers:
            optimizer = self.trainer.optimizers[0]
            for block in names:
                set_gate(optimizer, f"backbone.{block}", 0.0 if block in blocks else 1.0)
            if self.gate_only:  # frozen, they took zero-gradient steps (see hold_gradients): start afresh
                reset_optimizer_state(optimizer, [p for b in thawed_now for _, p in self.backbone.blocks()[b]])
        self.train(self.training)

    @override
    def train(self, mode: bool = True) -> TransferModule:
        """Lightning calls ``.train()`` every epoch; frozen BatchNorm must stay in eval mode through it."""
        super().train(mode)
        if not mode:
            return self
        if self.mode == "linear_probe":
            self.backbone.eval()
        else:
            set_batchnorm_modes(self.backbone, self.frozen_blocks, self.bn_policy)
        return self

    # ----------------------------------------------------------------- forward and steps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(batch, num_features)``; no graph is built in linear-probe mode."""
        if x.dtype == torch.uint8:
            raise TypeError("TransferModule got uint8 images: ImageDataModule(normalize_on_device=True) normalizes "
                            "them in its transfer_batch_to_device hook, which Lightning calls only when the data "
                            "module is passed as `datamodule=`; pass it that way, call `datamodule.normalize(images)`, "
                            "or set data.normalize_on_device=false")
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mode == "linear_probe":
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (multiclass) or binary cross-entropy with logits, with smoothing and class weights."""
        if self.task == "multiclass":
            return F.cross_entropy(logits, target, weight=self.class_weights, label_smoothing=self.label_smoothing)
        target_f = target.float().view_as(logits)
        smoothed = target_f * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        losses = F.binary_cross_entropy_with_logits(logits.float(), smoothed, reduction="none")
        if self.class_weights is not None:
            weights = self.class_weights[target.long()].view_as(logits) if self.task == "binary" else self.class_weights
            losses = losses * weights
        return losses.mean()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax for multiclass, sigmoid otherwise (binary: probability of class 1, shape ``(batch,)``)."""
        if self.task == "multiclass":
            return logits.float().softmax(-1)
        probs = logits.float().sigmoid()
        return probs.squeeze(-1) if self.task == "binary" else probs

    def shared_step(self, batch: Any, stage: str) -> torch.Tensor | None:
        """Forward, loss and metric update for the ``train`` / ``val`` / ``test`` stages."""
        if batch is None:  # every image of the batch was unreadable and data.bad_images='skip' left it out
            return None
        x, y = batch
        # Cached features (data.cache_features) come from this frozen backbone already: only the head runs.
        logits = self.head(x) if isinstance(batch, CachedFeatures) else self(x)
        loss = self.loss(logits, y)
        if stage == "train" and self.check_finite:
            self._raise_if_non_finite(self.loss_watch.watch(loss, x, self.global_step, self.current_epoch), x)
        probs = self.probabilities(logits.detach())
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(probs, y)
        if stage == "test":
            self.test_confusion.update(probs if self.task != "binary" else (probs > 0.5).long(), y)
        # Lightning reads every progress-bar value on the host after each step: not the step loss when sync-free.
        prog_bar = stage != "train" or not self._sync_free()
        self.log(f"{stage}_loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=prog_bar, batch_size=len(y))
        return loss

    def _sync_free(self) -> bool:
        return self.device.type == "cuda" if self.sync_free is None else self.sync_free

    def _raise_if_non_finite(self, found: NonFiniteLoss | None, x: object = None) -> None:
        if found is not None:
            optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
            raise NonFiniteLossError(diagnose(found, self.named_parameters(), optimizer, x))

    def _check_deferred_losses(self) -> None:
        """Read every loss the deferred check still holds: no validation, epoch end or checkpoint of a fit goes
        ahead with weights a NaN step broke."""
        if self.check_finite and self._trainer is not None and self.trainer.state.fn == "fit":
            self._raise_if_non_finite(self.loss_watch.flush(self.global_step))

    def _log_epoch_metrics(self, stage: str) -> None:
        # Logged once per epoch, not per step: each self.log of a Metric object walks Lightning's whole result
        # collection, which cost ~80 ms per step on CPU (5 metrics) and more than the step of a small model.
        if stage == "train":  # MulticlassRates computes four values at once: log them, then reset by hand
            self.log_dict(self.train_metrics.compute())
            self.train_metrics.reset()
        else:
            self.log_dict(getattr(self, f"{stage}_metrics"), prog_bar=stage == "val")

    @override
    def on_validation_start(self) -> None:
        self._check_deferred_losses()

    @override
    def on_train_epoch_end(self) -> None:
        self._check_deferred_losses()
        self._log_epoch_metrics("train")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

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
        if batch is None:  # every image of the batch was skipped (data.bad_images='skip')
            return {"paths": [], "probs": torch.empty(0, self.num_classes)}
        x, paths = batch
        return {"paths": list(paths), "probs": self.probabilities(self(x))}

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")
        if self.task == "multilabel":
            return
        names = self.class_names if self.task == "multiclass" else self.class_names[:2]
        self.last_test_report = format_report(self.test_confusion.compute().cpu(), names)
        self.test_confusion.reset()
        if self.trainer.is_global_zero:
            print(self.last_test_report)

    # ----------------------------------------------------------------- optimisation

    @override
    def setup(self, stage: str) -> None:
        rank_zero_info(f"transfer_lit preprocessing: {self.preprocessing.to_dict()}")
        if self.mode == "progressive" and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            raise ValueError("model.mode='progressive' is not supported with DeepSpeed; use strategy ddp or fsdp")
        self.set_frozen_blocks(self.frozen_blocks)
        strategy = self.trainer.strategy
        if strategy.root_device.type == "cuda" and not self.channels_last and _convolutional(self.backbone):
            self.backbone.to(memory_format=torch.channels_last)
            self.channels_last = True
        if self.compile_blocks and not getattr(self, "_compiled", False):
            # One graph per (frozen blocks, train/eval) combination: room for a recompile at every thaw.
            limit = 2 * len(self.backbone.block_names()) + 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
            self.backbone.compile(dynamic=False)
            self._compiled = True
        # isinstance: ddp_spawn and user subclasses are DDP too; DeepSpeedStrategy subclasses DDPStrategy but is not.
        ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        if ddp and self.trainer.world_size > 1:  # blocks frozen now and thawed later: synced by us, not DDP
            self._ddp_params_and_buffers_to_ignore = self.thawed_sync.take_frozen(self)

    @override
    def on_fit_start(self) -> None:
        self.loss_watch = LossWatch(deferred=self._sync_free())  # before the sanity check; nothing left from a last fit
        self.thawed_sync.broadcast()

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        hold_gradients(optimizer, self.backbone, self.gate_only, self.bn_policy)

    @override
    def on_after_backward(self) -> None:
        """Averages the gradients of blocks thawed after DDP wrapped the model: call ``super()`` when overriding."""
        # Here, right after backward, rather than before the optimizer step: under fp16 the grad scaler checks
        # the gradients for inf before that, and every rank must see the same (averaged) gradients then.
        # Under accumulation each micro-batch's reduce is exact: what earlier ones added is the same on every rank.
        self.thawed_sync.all_reduce()

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(build_param_groups(self.backbone, self.head, self.policy))
        if self.device.type == "cuda" and not self.gate_only:
            optimizer = prefer_fused(optimizer)
        install_lr_gate(optimizer, lambda: self.lr_scale, drop_frozen_grads=not self.gate_only)
        for block in self.frozen_blocks:
            set_gate(optimizer, f"backbone.{block}", 0.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.scheduler_interval, "monitor": self.scheduler_monitor}
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ----------------------------------------------------------------- checkpoint

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_deferred_losses()
        checkpoint["transfer_lit"] = {
            "preprocessing": self.preprocessing.to_dict(),
            "class_names": list(self.class_names),
            "frozen_blocks": sorted(self.frozen_blocks),
            "lr_scale": self.lr_scale,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.gate_only:  # sharded strategies hold flattened shards: shapes cannot be compared
            check_checkpoint_fits(checkpoint, self)
        state = checkpoint.get("transfer_lit")
        if state is None:
            return
        # The checkpoint's preprocessing is what the weights were trained with; an explicit override still wins.
        saved = Preprocessing.from_dict(state["preprocessing"])
        self.preprocessing = resolve_preprocessing(self.hparams.get("preprocessing"), saved)
        self.class_names = list(state["class_names"])
        self.lr_scale = float(state["lr_scale"])
        self.set_frozen_blocks(state["frozen_blocks"])
