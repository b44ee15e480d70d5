"""ProgressiveUnfreezing: thaw backbone blocks at scheduled epochs, each with an optional LR warm-up.

The callback never touches the optimizer's parameter groups: every group exists from step 0 and a
frozen block's groups are held still by a zero LR *gate* (:mod:`transfer_lit.freezing.gates`).
Thawing is ``TransferModule.set_frozen_blocks`` (``requires_grad``, BatchNorm mode, gate 0 -> 1),
and the warm-up only moves the gate. So any LR scheduler composes with the schedule, and the
phase is a pure function of ``(schedule, epoch, global step)``: a resumed run replays it exactly.

It relies only on the module protocol :class:`~transfer_lit.protocols.Unfreezable` (``TransferModule``
follows it): ``set_frozen_blocks`` to thaw, ``set_block_gates`` for the warm-up.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from transfer_lit.freezing.blocks import batchnorms
from transfer_lit.protocols import Unfreezable
from transfer_lit.schedulers import LinearWarmup

Schedule = dict[int, list[str] | str]
Phase = tuple[int, list[str]]


class ProgressiveUnfreezing(Callback):
    """Thaw the backbone of a ``TransferModule`` (``model.mode: progressive``) block by block.

    Give either ``schedule`` or ``every_n_epochs``. In YAML::

        trainer:
          callbacks:
            - class_path: transfer_lit.ProgressiveUnfreezing
              init_args:
                schedule: {2: [layer4], 4: [layer3], 6: all}
                warmup_steps: 50

    The schedule is checked against the backbone's blocks before training starts. Each phase prints
    a line with the trainable / total parameter counts and logs ``unfreeze_phase`` and
    ``trainable_params``. The phase and each block's thaw step are saved in checkpoints.

    Args:
        schedule: ``{epoch: blocks}``: at the start of ``epoch`` (0-based) thaw ``blocks``: a list of
            backbone block names, one name, or ``"all"`` (every block still frozen). Epochs must be
            strictly increasing, and each block is thawed once.
        every_n_epochs: instead of ``schedule``: thaw one more block every ``every_n_epochs`` epochs,
            starting from the head side (the output-side block first).
        start_epoch: with ``every_n_epochs``: epoch of the first thaw (default: ``every_n_epochs``).
        num_blocks: with ``every_n_epochs``: how many blocks to thaw in all (default: every block).
        warmup_steps: the learning rate of a newly thawed block ramps up linearly over this many
            optimizer steps (gate ``(k + 1) / warmup_steps`` on the k-th step after its thaw);
            0 = full learning rate at once.
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        every_n_epochs: int | None = None,
        start_epoch: int | None = None,
        num_blocks: int | None = None,
        warmup_steps: int = 0,
    ) -> None:
        if (schedule is None) == (every_n_epochs is None):
            raise ValueError(
                "ProgressiveUnfreezing: give exactly one of `schedule` ({epoch: blocks}) or `every_n_epochs`, "
                f"got schedule={schedule!r} and every_n_epochs={every_n_epochs!r}"
            )
        if schedule is not None and (start_epoch is not None or num_blocks is not None):
            raise ValueError("ProgressiveUnfreezing: `start_epoch` and `num_blocks` go with `every_n_epochs`, "
                             "not with `schedule`")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"ProgressiveUnfreezing.every_n_epochs must be >= 1, got {every_n_epochs}")
        if start_epoch is not None and start_epoch < 0:
            raise ValueError(f"ProgressiveUnfreezing.start_epoch must be >= 0, got {start_epoch}")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"ProgressiveUnfreezing.num_blocks must be >= 1, got {num_blocks}")
        if warmup_steps < 0:
            raise ValueError(f"ProgressiveUnfreezing.warmup_steps must be >= 0, got {warmup_steps}")
        self.schedule = _check_epochs(schedule) if schedule is not None else None
        self.every_n_epochs = every_n_epochs
        self.start_epoch = start_epoch
        self.num_blocks = num_blocks
        self.warmup_steps = warmup_steps
        self._warmup = LinearWarmup(warmup_steps)
        self.phases: list[Phase] = []
        self.thaw_steps: dict[str, int] = {}  # block -> global step at which it was thawed
        self.phase = 0
        self._blocks: list[str] = []
        self._sizes: dict[str, tuple[int, int]] = {}  # block -> (parameters, of which BatchNorm)
        self._total = 0
        self._announced: int | None = None

    # ------------------------------------------------------------------ the schedule

    def resolve_phases(self, blocks: list[str]) -> list[Phase]:
        """The schedule as ``[(epoch, [block, ...]), ...]`` for a backbone with ``blocks`` (input -> output).

        Raises:
            ValueError: naming the key, the value and the valid block names, for an unknown block, a
                block thawed twice, an empty phase, a phase with nothing left to thaw, or more blocks
                than the backbone has.
        """
        valid = f"valid blocks (input -> output) are {blocks} or 'all'"
        if self.schedule is None:
            assert self.every_n_epochs is not None
            count = len(blocks) if self.num_blocks is None else self.num_blocks
            if count > len(blocks):
                raise ValueError(f"ProgressiveUnfreezing.num_blocks={count} but the backbone has only "
                                 f"{len(blocks)} blocks: {blocks}")
            order = blocks[::-1][:count]
            start = self.every_n_epochs if self.start_epoch is None else self.start_epoch
            return [(start + i * self.every_n_epochs, [block]) for i, block in enumerate(order)]
        phases: list[Phase] = []
        thawed_at: dict[str, int] = {}
        for epoch, value in self.schedule.items():
            key = f"ProgressiveUnfreezing.schedule[{epoch}]"
            names = [value] if isinstance(value, str) else list(value)
            if not names:
                raise ValueError(f"{key} is empty; {valid}")
            if "all" in names:
                if names != ["all"]:
                    raise ValueError(f"{key}={value!r}: 'all' cannot be combined with block names; {valid}")
                names = [b for b in blocks if b not in thawed_at]
                if not names:
                    raise ValueError(f"{key}='all' thaws nothing: every block of {blocks} is already thawed by then "
                                     f"(the schedule goes past the last block)")
            for name in names:
                if name not in blocks:
                    raise ValueError(f"{key}: unknown block {name!r}; {valid}")
                if name in thawed_at:
                    raise ValueError(f"{key}: block {name!r} is thawed twice (already at epoch {thawed_at[name]}); "
                                     f"each of {blocks} can be thawed once")
                thawed_at[name] = epoch
            phases.append((epoch, sorted(set(names), key=blocks.index)))
        return phases

    def phase_at(self, epoch: int) -> int:
        """Number of phases started by ``epoch`` (0 = only the head trains)."""
        return sum(1 for start, _ in self.phases if start <= epoch)

    def warmup_gate(self, steps_since_thaw: int) -> float:
        """LR gate of a block ``steps_since_thaw`` optimizer steps after its thaw."""
        return self._warmup(steps_since_thaw)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, Unfreezable):
            raise TypeError(f"ProgressiveUnfreezing needs a transfer_lit.TransferModule (the Unfreezable protocol), "
                            f"got {type(pl_module).__name__}")
        mode = pl_module.mode
        if mode != "progressive":
            raise ValueError(
                f"ProgressiveUnfreezing needs model.mode='progressive', got model.mode={mode!r} ('finetune' trains "
                "every block from the start; 'linear_probe' runs the backbone without gradients)"
            )
        backbone = pl_module.backbone
        # A new run (a reused callback too) starts at phase 0; a resumed one then loads its state over this.
        self.thaw_steps, self.phase, self._announced = {}, 0, None
        self._blocks = backbone.block_names()
        self.phases = self.resolve_phases(self._blocks)
        max_epochs = trainer.max_epochs
        late = [epoch for epoch, _ in self.phases if max_epochs is not None and 0 <= max_epochs <= epoch]
        if late:
            rank_zero_warn(f"ProgressiveUnfreezing: phase(s) at epoch(s) {late} never start with "
                           f"trainer.max_epochs={max_epochs}")
        # Counted before the strategy wraps (and maybe shards) the parameters.
        for block, params in backbone.block_params().items():
            bn = sum(p.numel() for m in batchnorms(backbone.block_modules(block)) for p in m.parameters(recurse=False))
            self._sizes[block] = (sum(p.numel() for _, p in params), bn)
        self._total = sum(p.numel() for p in pl_module.parameters())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = cast(Unfreezable, pl_module)
        self.phase = self.phase_at(trainer.current_epoch)
        thawed = {block for _, blocks in self.phases[: self.phase] for block in blocks}
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
            new = self.phases[self.phase - 1][1] if self.phase else []
            rank_zero_info(
                f"ProgressiveUnfreezing: epoch {trainer.current_epoch}, phase {self.phase}/{len(self.phases)}: "
                f"thawed {new or 'nothing (head only)'}; frozen {sorted(frozen, key=self._blocks.index)}; "
                f"trainable parameters {trainable:,} / {self._total:,} ({100 * trainable / max(1, self._total):.1f}%)"
            )
        pl_module.log("unfreeze_phase", float(self.phase), on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("trainable_params", float(trainable), on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.warmup_steps == 0:
            return
        module = cast(Unfreezable, pl_module)
        module.set_block_gates({block: self.warmup_gate(trainer.global_step - step)
                                for block, step in self.thaw_steps.items() if block not in module.frozen_blocks})

    def trainable_params(self, frozen: set[str], bn_policy: str) -> int:
        """Parameters the optimizer updates when ``frozen`` blocks are frozen (BatchNorm ones stay frozen under
        ``bn_policy='frozen'`` and train in frozen blocks under ``train_bn``)."""
        def held(block: str, size: int, bn: int) -> int:
            if block in frozen:
                return size - bn if bn_policy == "train_bn" else size
            return bn if bn_policy == "frozen" else 0
        return self._total - sum(held(b, size, bn) for b, (size, bn) in self._sizes.items())

    # ------------------------------------------------------------------ checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "thaw_steps": dict(self.thaw_steps), "phases": [list(p) for p in self.phases]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = int(state_dict["phase"])
        self.thaw_steps = {str(k): int(v) for k, v in state_dict["thaw_steps"].items()}
        saved = [(int(e), list(b)) for e, b in state_dict.get("phases", [])]
        if self.phases and saved and saved != self.phases:
            rank_zero_warn(f"ProgressiveUnfreezing: the checkpoint was trained with phases {saved}; "
                           f"continuing with {self.phases}")


def _check_epochs(schedule: Schedule) -> Schedule:
    """Epoch keys as integers >= 0, strictly increasing in the order given."""
    if not isinstance(schedule, dict) or not schedule:
        raise ValueError(f"ProgressiveUnfreezing.schedule must be a non-empty {{epoch: blocks}} mapping, "
                         f"got {schedule!r}")
    checked: Schedule = {}
    for key, value in schedule.items():
        epoch = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"ProgressiveUnfreezing.schedule: epoch keys must be integers >= 0, got {key!r}")
        if not isinstance(value, str | list | tuple):
            raise ValueError(f"ProgressiveUnfreezing.schedule[{epoch}] must be a block name, a list of block names "
                             f"or 'all', got {value!r}")
        checked[epoch] = value if isinstance(value, str) else list(value)
    epochs = list(checked)
    if any(b <= a for a, b in itertools.pairwise(epochs)):
        raise ValueError(f"ProgressiveUnfreezing.schedule: epochs must be strictly increasing in the order given, "
                         f"got {epochs}")
    return checked
