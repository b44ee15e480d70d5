"""ProgressiveUnfreezing: thaw backbone blocks on a schedule of epochs or when a metric stops improving.

The callback never adds or removes optimizer parameter groups: every group exists from step 0 and a frozen
block's groups are held still by a zero LR *gate* (:mod:`transfer_lit.freezing.gates`). Thawing is
``TransferModule.set_frozen_blocks`` (``requires_grad``, BatchNorm mode, gate 0 -> 1), and the warm-up only moves
the gate. So any LR scheduler composes with the schedule. Which phase runs is a function of the phase start
epochs, which are saved in checkpoints with the metric's best value and patience counter: a resumed run replays
the schedule exactly, in the middle of a metric-driven phase too.

It relies only on the module protocol :class:`~transfer_lit.protocols.Unfreezable` (``TransferModule`` follows it).
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from transfer_lit.callbacks.phases import (
    ParameterCounts,
    Phase,
    Schedule,
    apply_lr_options,
    carve_regex_entries,
    check_options,
    check_schedule,
    every_n_phases,
    phase_table,
    resolve_phases,
    schedule_yaml,
)
from transfer_lit.callbacks.transitions import MetricTransitions, Plateau
from transfer_lit.protocols import Unfreezable
from transfer_lit.schedulers import LinearWarmup, check_restartable


class ProgressiveUnfreezing(Callback):
    """Thaw the backbone of a ``TransferModule`` (``model.mode: progressive``) block by block.

    Give either ``schedule`` or ``every_n_epochs``. In YAML::

        trainer:
          callbacks:
            - class_path: transfer_lit.ProgressiveUnfreezing
              init_args:
                schedule: {2: [layer4], 4: {blocks: [layer3], lr_scale: 0.5}, 6: all}
                warmup_steps: 50

    **Epoch-driven** (default): phase ``k`` starts at the epoch of its key. **Metric-driven** (``monitor`` given,
    finetuning-scheduler's ``FTSEarlyStopping``): each phase, the head-only one included, ends when ``monitor``
    has not improved for ``patience`` validation runs, or after its length in the schedule (the gap to the next
    key; the first key for the head-only phase), whichever comes first; the next phase starts at the next epoch,
    so later keys move earlier with it. After the last phase's rule (``patience``, or ``last_phase_epochs``)
    training stops.

    The schedule is checked against the backbone's blocks before training starts and printed as a table. Each
    phase prints a line with the trainable / total parameter counts and logs ``unfreeze_phase`` and
    ``trainable_params``. The phase state is saved in checkpoints.

    Args:
        schedule: ``{epoch: blocks}``: at the start of ``epoch`` (0-based) thaw ``blocks``: a list of backbone block
            names, one name, ``"all"`` (every block still frozen), or ``{blocks: ..., lr_scale: x,
            restart_schedule: true}``: from this phase on every group's learning rate is x times the configured one
            (fastai's ``fine_tune`` halves it), and the LR scheduler starts over from its first step (its warm-up
            included; ``WarmupDecay`` sized to the steps left). Without it one schedule spans the run, so a
            late-thawed block starts on an already decayed learning rate. Epochs strictly increase; each block
            thaws once.
        every_n_epochs: instead of ``schedule``: thaw one more block every ``every_n_epochs`` epochs, starting from
            the head side (the output-side block first).
        start_epoch: with ``every_n_epochs``: epoch of the first thaw (default: ``every_n_epochs``).
        num_blocks: depth cap: only this many blocks from the output side ever thaw (``all`` means those).
        warmup_steps: the learning rate of a newly thawed block ramps up linearly over this many optimizer steps
            (gate ``(k + 1) / warmup_steps`` on the k-th step after its thaw); 0 = full learning rate at once.
        monitor: a validation metric (``val_loss``, ``val_f1``, ...): phases end when it stops improving.
        monitor_mode: ``min`` (lower is better) or ``max``.
        patience: validation runs without improvement that end a phase.
        min_delta: smaller improvements do not count.
        last_phase_epochs: with ``monitor``: the longest the last phase runs (default: until ``patience`` or
            ``trainer.max_epochs``).
        restore_best: with ``monitor``: when a phase ends, reload its best weights (and BatchNorm statistics; the
            optimizer state stays) before the next blocks thaw (finetuning-scheduler's ``restore_best``). The best
            weights are kept in memory and in checkpoints (they double its size); not under FSDP / DeepSpeed.
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        every_n_epochs: float | None = None,
        start_epoch: float | None = None,
        num_blocks: int | None = None,
        warmup_steps: int = 0,
        monitor: str | None = None,
        monitor_mode: Literal["min", "max"] = "min",
        patience: int = 1,
        min_delta: float = 0.0,
        last_phase_epochs: int | None = None,
        restore_best: bool = False,
    ) -> None:
        check_options(schedule, every_n_epochs, start_epoch, num_blocks, warmup_steps, monitor, last_phase_epochs,
                      restore_best)
        self.schedule = check_schedule(schedule) if schedule is not None else None
        self.every_n_epochs, self.start_epoch, self.num_blocks = every_n_epochs, start_epoch, num_blocks
        self.warmup_steps = warmup_steps
        self.monitor, self.last_phase_epochs, self.restore_best = monitor, last_phase_epochs, restore_best
        self.transitions = None if monitor is None else MetricTransitions(
            Plateau(monitor, monitor_mode, patience, min_delta), last_phase_epochs, restore_best)
        self._warmup = LinearWarmup(warmup_steps)
        self.phases: list[Phase] = []
        self.starts: list[float] = []  # the epoch each phase after the head-only one started (or starts) at
        self._step_starts: list[int] | None = None  # with fractional epochs: the global step each phase starts at
        self.thaw_steps: dict[str, int] = {}  # block -> global step at which it was thawed
        self.phase = 0
        self._blocks: list[str] = []
        self._counts: ParameterCounts | None = None
        self._announced: int | None = None

    # ------------------------------------------------------------------ the schedule

    def resolve_phases(self, blocks: list[str]) -> list[Phase]:
        """The schedule as :class:`Phase` s for a backbone with ``blocks`` (input -> output).

        Raises:
            ValueError: naming the key, the value and the valid block names (:func:`resolve_phases`).
        """
        if self.schedule is None:
            assert self.every_n_epochs is not None
            return every_n_phases(blocks, self.every_n_epochs, self.start_epoch, self.num_blocks)
        return resolve_phases(self.schedule, blocks, self.num_blocks)

    def phase_at(self, epoch: int) -> int:
        """Number of phases started by ``epoch`` (0 = only the head trains)."""
        return sum(1 for start in self.starts if start <= epoch)

    def warmup_gate(self, steps_since_thaw: int) -> float:
        """LR gate of a block ``steps_since_thaw`` optimizer steps after its thaw."""
        return self._warmup(steps_since_thaw)

    def schedule_yaml(self) -> str:
        """This callback with its resolved phases spelled out, as YAML that ``fit --config`` accepts (after setup)."""
        plateau = self.transitions.plateau if self.transitions else None
        options = {"warmup_steps": self.warmup_steps or None, "monitor": self.monitor,
                   "monitor_mode": plateau.mode if plateau else None, "patience": plateau.patience if plateau else None,
                   "min_delta": plateau.min_delta if plateau and plateau.min_delta else None,
                   "last_phase_epochs": self.last_phase_epochs, "restore_best": self.restore_best or None}
        return schedule_yaml(self.phases, options)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, Unfreezable):
            raise TypeError(f"ProgressiveUnfreezing needs a transfer_lit.TransferModule (the Unfreezable protocol), "
                            f"got {type(pl_module).__name__}")
        if pl_module.mode != "progressive":
            raise ValueError(
                f"ProgressiveUnfreezing needs model.mode='progressive', got model.mode={pl_module.mode!r} "
                "('finetune' trains every block from the start; 'linear_probe' runs the backbone without gradients)"
            )
        # A new run (a reused callback too) starts at phase 0; a resumed one then loads its state over this.
        self.thaw_steps, self.phase, self._announced = {}, 0, None
        if self.transitions is not None:
            self.transitions.reset()
        table = self.plan(pl_module)
        self.starts = [] if self.monitor else [p.epoch for p in self.phases]
        late = [p.epoch for p in self.phases if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= p.epoch]
        if late and not self.monitor:
            rank_zero_warn(f"ProgressiveUnfreezing: phase(s) at epoch(s) {late} never start with "
                           f"trainer.max_epochs={trainer.max_epochs}")
        rank_zero_info(table)

    def plan(self, module: Unfreezable) -> str:
        """Resolve the schedule against ``module``'s backbone (raising on a bad one) and return it as a table."""
        carve_regex_entries(self.schedule, module)
        self._blocks = module.backbone.block_names()
        self.phases = self.resolve_phases(self._blocks)
        if self.monitor and any(isinstance(p.epoch, float) for p in self.phases):
            raise ValueError(f"ProgressiveUnfreezing: fractional epochs {[p.epoch for p in self.phases]} go with an "
                             f"epoch-driven schedule; a metric-driven one ends phases after validation runs")
        self._counts = ParameterCounts(module.backbone, sum(p.numel() for p in cast(Any, module).parameters()))
        frozen = set(self._blocks)
        counts = [self.trainable_params(frozen, module.bn_policy)]
        for phase in self.phases:
            frozen -= set(phase.blocks)
            counts.append(self.trainable_params(frozen, module.bn_policy))
        rule = (f"metric-driven: a phase ends when {self.monitor} stops improving for "
                f"{self.transitions.plateau.patience} validation run(s)" if self.transitions else "epoch-driven")
        return (f"ProgressiveUnfreezing: {len(self.phases)} phases after the head-only phase 0, {rule}\n"
                + phase_table(self.phases, counts, self._counts.total, self.monitor))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refusal = cast(Unfreezable, pl_module).freezing.unwrapped_refusal()
        if self.restore_best and refusal is not None:
            raise ValueError(f"ProgressiveUnfreezing.restore_best needs the model's weights in one piece: {refusal}")
        restarts = [p.epoch for p in self.phases if p.restart_schedule]
        if restarts and not trainer.lr_scheduler_configs:
            raise ValueError(f"ProgressiveUnfreezing.schedule[{restarts[0]}].restart_schedule needs a learning-rate "
                             f"schedule to restart; set model.lr_scheduler (e.g. transfer_lit.schedulers.WarmupDecay)")
        for config in trainer.lr_scheduler_configs if restarts else []:
            if (why := check_restartable(config.scheduler)) is not None:
                raise ValueError(f"ProgressiveUnfreezing.schedule[{restarts[0]}].restart_schedule: {why}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_starts = None
        if any(isinstance(p.epoch, float) for p in self.phases):  # a phase starts inside an epoch: count in steps
            per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            self._step_starts = [round(p.epoch * per_epoch) for p in self.phases]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.transitions is not None:
            self.transitions.end_capped(self.phases, self.starts, trainer.current_epoch)
        self._enter(trainer, cast(Unfreezable, pl_module), self._current_phase(trainer))

    def _current_phase(self, trainer: pl.Trainer) -> int:
        if self._step_starts is not None:
            return sum(1 for step in self._step_starts if step <= trainer.global_step)
        return self.phase_at(trainer.current_epoch)

    def _enter(self, trainer: pl.Trainer, module: Unfreezable, phase: int) -> None:
        """Make ``phase`` the running one: thaw its blocks (the first time: its LR options, restore-best), log it."""
        pl_module = cast(pl.LightningModule, module)
        if phase > self.phase:  # a transition in this run (a resumed run loads the phase it was in)
            if self.transitions is not None:
                self.transitions.restore(pl_module, self.phase)
            for k in range(self.phase + 1, phase + 1):
                apply_lr_options(self.phases, k, trainer)
        self.phase = phase
        thawed = {block for p in self.phases[: self.phase] for block in p.blocks}
        was_frozen = set(module.frozen_blocks)
        for block in sorted(thawed, key=self._blocks.index):
            if block not in self.thaw_steps:
                # A block thawed in the checkpoint but unknown to this callback's state is already warm.
                newly = block in was_frozen
                self.thaw_steps[block] = trainer.global_step if newly else trainer.global_step - self.warmup_steps
        frozen = set(self._blocks) - thawed
        if frozen != was_frozen:
            module.set_frozen_blocks(frozen)
        trainable = self.trainable_params(frozen, module.bn_policy)
        if self._announced != self.phase:
            self._announced = self.phase
            new = self.phases[self.phase - 1].blocks if self.phase else []
            total = self._counts.total if self._counts else 0
            rank_zero_info(
                f"ProgressiveUnfreezing: epoch {trainer.current_epoch} (step {trainer.global_step}), phase "
                f"{self.phase}/{len(self.phases)}: thawed {new or 'nothing (head only)'}; frozen "
                f"{sorted(frozen, key=self._blocks.index)}; trainable parameters {trainable:,} / {total:,} "
                f"({100 * trainable / max(1, total):.1f}%)"
            )
        pl_module.log("unfreeze_phase", float(self.phase), on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("trainable_params", float(trainable), on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        module = cast(Unfreezable, pl_module)
        if self._step_starts is not None and batch_idx % trainer.accumulate_grad_batches == 0 \
                and self._current_phase(trainer) > self.phase:
            self._enter(trainer, module, self._current_phase(trainer))
        if self.warmup_steps:
            module.set_block_gates({block: self.warmup_gate(trainer.global_step - step)
                                    for block, step in self.thaw_steps.items() if block not in module.frozen_blocks})

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before ModelCheckpoint saves (Lightning runs checkpoint callbacks last): the decision is in the checkpoint.
        if self.transitions is not None and not trainer.sanity_checking:
            self.transitions.check(trainer, pl_module, self.phase, self.phases, self.starts)

    def trainable_params(self, frozen: set[str], bn_policy: str) -> int:
        """Parameters the optimizer updates when ``frozen`` blocks are frozen (after :meth:`plan`)."""
        assert self._counts is not None, "plan() counts the parameters"
        return self._counts.trainable(frozen, bn_policy)

    # ------------------------------------------------------------------ checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"phase": self.phase, "thaw_steps": dict(self.thaw_steps), "starts": list(self.starts),
                 "phases": [[p.epoch, p.blocks] for p in self.phases]}
        return state | (self.transitions.state_dict() if self.transitions else {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = int(state_dict["phase"])
        self.thaw_steps = {str(k): int(v) for k, v in state_dict["thaw_steps"].items()}
        if self.transitions is not None:
            self.starts = [int(s) for s in state_dict.get("starts", [])]
            self.transitions.load_state_dict(state_dict)
        saved = [(int(e), list(b)) for e, b in state_dict.get("phases", [])]
        if self.phases and saved and saved != [(p.epoch, p.blocks) for p in self.phases]:
            rank_zero_warn(f"ProgressiveUnfreezing: the checkpoint was trained with phases {saved}; "
                           f"continuing with {[(p.epoch, p.blocks) for p in self.phases]}")
