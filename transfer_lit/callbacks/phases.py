"""The phases of a progressive-unfreezing schedule: parsing, checking against a backbone, and the printed table.

A schedule maps an epoch to what thaws then: a block name, a list of names, ``"all"``, or a mapping that also sets
the phase's learning rates::

    schedule:
      1: [layer4]
      3: {blocks: all, lr_scale: 0.5, restart_schedule: true}

Entries are validated here, once, before training starts (:func:`resolve_phases`), so a typo fails at once naming
the key, the value and the valid block names.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import yaml

from transfer_lit.backbones.base import REGEX_PREFIX
from transfer_lit.freezing.blocks import batchnorms
from transfer_lit.schedulers import restart, scale_lrs

ScheduleValue = str | list[str] | dict[str, Any]
Schedule = dict[float, ScheduleValue]
_OPTIONS = ("blocks", "lr_scale", "restart_schedule")


class Phase(NamedTuple):
    """One phase: from ``epoch`` (with ``monitor``: at the latest; 1.5 = halfway through epoch 1), ``blocks`` thaw.

    ``lr_scale``: every group's learning rate x this from the phase on (``None``: as the previous phase);
    ``restart_schedule``: the LR scheduler starts again from its first step when the phase begins.
    """

    epoch: int | float
    blocks: list[str]
    lr_scale: float | None = None
    restart_schedule: bool = False


def check_options(schedule: Any, every_n_epochs: float | None, start_epoch: float | None, num_blocks: int | None,
                  warmup_steps: int, monitor: str | None, last_phase_epochs: int | None, restore_best: bool) -> None:
    """The callback's options, each against the others (the schedule itself: :func:`check_schedule`)."""
    if (schedule is None) == (every_n_epochs is None):
        raise ValueError(
            "ProgressiveUnfreezing: give exactly one of `schedule` ({epoch: blocks}) or `every_n_epochs`, "
            f"got schedule={schedule!r} and every_n_epochs={every_n_epochs!r}"
        )
    if schedule is not None and start_epoch is not None:
        raise ValueError("ProgressiveUnfreezing: `start_epoch` goes with `every_n_epochs`, not with `schedule`")
    if every_n_epochs is not None and not every_n_epochs > 0:
        raise ValueError(f"ProgressiveUnfreezing.every_n_epochs must be > 0 (0.5 = every half epoch), got "
                         f"{every_n_epochs}")
    for key, value, least in (("start_epoch", start_epoch, 0), ("num_blocks", num_blocks, 1),
                              ("warmup_steps", warmup_steps, 0), ("last_phase_epochs", last_phase_epochs, 1)):
        if value is not None and value < least:
            raise ValueError(f"ProgressiveUnfreezing.{key} must be >= {least}, got {value}")
    if monitor is None and (restore_best or last_phase_epochs is not None):
        raise ValueError("ProgressiveUnfreezing: `restore_best` and `last_phase_epochs` go with a metric-driven "
                         "schedule; set `monitor` (e.g. val_loss)")


def check_schedule(schedule: Mapping[Any, Any]) -> Schedule:
    """Epoch keys as integers >= 0, strictly increasing in the order given; values of a known form."""
    if not isinstance(schedule, Mapping) or not schedule:
        raise ValueError(f"ProgressiveUnfreezing.schedule must be a non-empty {{epoch: blocks}} mapping, "
                         f"got {schedule!r}")
    checked: dict[Any, ScheduleValue] = {}
    for key, value in schedule.items():
        epoch = _as_epoch(key)
        if epoch is None:
            raise ValueError(f"ProgressiveUnfreezing.schedule: epoch keys must be numbers >= 0 (1.5 = halfway through "
                             f"epoch 1), got {key!r}")
        where = f"ProgressiveUnfreezing.schedule[{epoch}]"
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(_OPTIONS))
            if unknown or "blocks" not in value:
                raise ValueError(f"{where}: a phase mapping takes the keys {list(_OPTIONS)} ('blocks' required), "
                                 f"got {sorted(value)}")
            scale = value.get("lr_scale")
            if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0):
                raise ValueError(f"{where}.lr_scale must be a positive number, got {scale!r}")
            if not isinstance(value.get("restart_schedule", False), bool):
                raise ValueError(f"{where}.restart_schedule must be true or false, got {value['restart_schedule']!r}")
            checked[epoch] = dict(value)
        elif isinstance(value, str | list | tuple):
            checked[epoch] = value if isinstance(value, str) else list(value)
        else:
            raise ValueError(f"{where} must be a block name, a list of block names, 'all' or a mapping with "
                             f"{list(_OPTIONS)}, got {value!r}")
    epochs = list(checked)
    if any(b <= a for a, b in itertools.pairwise(epochs)):
        raise ValueError(f"ProgressiveUnfreezing.schedule: epochs must be strictly increasing in the order given, "
                         f"got {epochs}")
    return checked


def _as_epoch(key: Any) -> int | float | None:
    """A schedule key as an epoch: an integer, or a float for a point inside an epoch; ``None`` if invalid."""
    if isinstance(key, str):
        try:
            key = float(key)
        except ValueError:
            return None
    if isinstance(key, bool) or not isinstance(key, int | float) or not key >= 0 or key == float("inf"):
        return None
    return int(key) if key == int(key) else float(key)


def resolve_phases(schedule: Schedule, blocks: list[str], num_blocks: int | None = None) -> list[Phase]:
    """``schedule`` as phases for a backbone with ``blocks`` (input -> output); ``num_blocks`` caps the depth: only
    that many blocks from the output side may thaw, and ``all`` means all of those.

    Raises:
        ValueError: naming the key, the value and the valid block names, for an unknown block, one below the depth
            cap, a block thawed twice, an empty phase, or a phase with nothing left to thaw.
    """
    thawable = _thawable(blocks, num_blocks)
    valid = f"valid blocks (input -> output) are {blocks} or 'all'"
    phases: list[Phase] = []
    thawed_at: dict[str, float] = {}
    for epoch, value in schedule.items():
        key = f"ProgressiveUnfreezing.schedule[{epoch}]"
        options: dict[str, Any] = value if isinstance(value, dict) else {"blocks": value}
        entry = options["blocks"]
        names = [entry] if isinstance(entry, str) else list(entry)
        if not names:
            raise ValueError(f"{key} is empty; {valid}")
        if "all" in names:
            if names != ["all"]:
                raise ValueError(f"{key}={entry!r}: 'all' cannot be combined with block names; {valid}")
            names = [b for b in thawable if b not in thawed_at]
            if not names:
                raise ValueError(f"{key}='all' thaws nothing: every block of {thawable} is already thawed by then "
                                 f"(the schedule goes past the last block)")
        for name in names:
            if name not in blocks:
                raise ValueError(f"{key}: unknown block {name!r}; {valid}")
            if name not in thawable:
                raise ValueError(f"{key}: block {name!r} is deeper than the depth cap num_blocks={num_blocks} "
                                 f"allows; it may thaw {thawable}")
            if name in thawed_at:
                raise ValueError(f"{key}: block {name!r} is thawed twice (already at epoch {thawed_at[name]}); "
                                 f"each of {blocks} can be thawed once")
            thawed_at[name] = epoch
        phases.append(Phase(epoch, sorted(set(names), key=blocks.index), options.get("lr_scale"),
                            bool(options.get("restart_schedule", False))))
    return phases


def every_n_phases(blocks: list[str], every_n_epochs: float, start_epoch: float | None,
                   num_blocks: int | None) -> list[Phase]:
    """One more block every ``every_n_epochs`` epochs (may be a fraction) from ``start_epoch``, the output-side block
    first."""
    order = _thawable(blocks, num_blocks)[::-1]
    start = every_n_epochs if start_epoch is None else start_epoch
    return [Phase(_as_epoch(round(start + i * every_n_epochs, 9)) or 0, [block]) for i, block in enumerate(order)]


def regex_entries(schedule: Schedule | None) -> dict[str, float]:
    """The schedule's ``re:<regex>`` entries (parameter-level: the parameters whose names match) and their epochs."""
    found: dict[str, float] = {}
    for epoch, value in (schedule or {}).items():
        entry = value["blocks"] if isinstance(value, dict) else value
        for name in [entry] if isinstance(entry, str) else entry:
            if name.startswith(REGEX_PREFIX):
                found[name] = epoch
    return found


def carve_regex_entries(schedule: Schedule | None, module: Any) -> None:
    """Give each ``re:<regex>`` entry of ``schedule`` a block of its own in ``module``'s backbone (frozen with the
    block it comes from), validated like a block name."""
    entries = regex_entries(schedule)
    for name, epoch in entries.items():
        if name in module.frozen.names:
            continue
        try:
            re.compile(name[len(REGEX_PREFIX):])
            module.frozen.carve({name: name[len(REGEX_PREFIX):]})
        except (re.error, ValueError) as error:
            raise ValueError(f"ProgressiveUnfreezing.schedule[{epoch}]: {name!r}: {error}") from None
    if entries:
        module.set_frozen_blocks(module.frozen_blocks)  # the carved blocks, frozen or not, as the strategy means it


def _thawable(blocks: list[str], num_blocks: int | None) -> list[str]:
    if num_blocks is None:
        return list(blocks)
    if num_blocks > len(blocks):
        raise ValueError(f"ProgressiveUnfreezing.num_blocks={num_blocks} but the backbone has only {len(blocks)} "
                         f"blocks: {blocks}")
    return blocks[len(blocks) - num_blocks:]


def phase_table(phases: Sequence[Phase], trainable: Sequence[int], total: int, metric: str | None) -> str:
    """The resolved schedule as a table: when each phase starts, what it thaws, its LR options, trainable share."""
    when = "at the latest at epoch" if metric else "epoch"
    rows = [("phase", "starts", "thaws", "lr", "trainable")]
    starts = [0] + [p.epoch for p in phases]
    for i, count in enumerate(trainable):
        phase = phases[i - 1] if i else None
        thaws = ", ".join(phase.blocks) if phase else "nothing (head only)"
        lr = "" if phase is None else " ".join(
            ([f"x{phase.lr_scale:g}"] if phase.lr_scale is not None else [])
            + (["restart schedule"] if phase.restart_schedule else []))
        rows.append((str(i), f"{when} {starts[i]}" if i else "epoch 0", _shorten(thaws), lr or "-",
                     f"{count:,} ({100 * count / max(1, total):.1f}%)"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def schedule_yaml(phases: Sequence[Phase], options: Mapping[str, Any]) -> str:
    """The callback as YAML with every phase spelled out in block names: edit it and give it back to ``fit``
    (as a ``--config``) to train exactly this schedule."""
    schedule: dict[float, Any] = {}
    for phase in phases:
        extra = {k: v for k, v in (("lr_scale", phase.lr_scale), ("restart_schedule", phase.restart_schedule)) if v}
        schedule[phase.epoch] = {"blocks": phase.blocks, **extra} if extra else phase.blocks
    init_args = {"schedule": schedule, **{k: v for k, v in options.items() if v is not None}}
    callback = {"class_path": "transfer_lit.ProgressiveUnfreezing", "init_args": init_args}
    return yaml.safe_dump({"trainer": {"callbacks": [callback]}}, sort_keys=False, default_flow_style=None)


def apply_lr_options(phases: Sequence[Phase], k: int, trainer: pl.Trainer) -> None:
    """Phase ``k`` begins: its ``restart_schedule``, then its ``lr_scale`` (relative to the phases before it)."""
    phase = phases[k - 1]
    configs = trainer.lr_scheduler_configs
    if phase.restart_schedule:
        for config in configs:
            left = (trainer.estimated_stepping_batches - trainer.global_step if config.interval == "step"
                    else (trainer.max_epochs or 0) - trainer.current_epoch)
            restart(config.scheduler, int(left))  # type: ignore[arg-type]
    if phase.lr_scale is not None and trainer.optimizers:
        before = next((p.lr_scale for p in phases[: k - 1][::-1] if p.lr_scale is not None), 1.0)
        scale_lrs(trainer.optimizers[0], [c.scheduler for c in configs], phase.lr_scale / before)


class ParameterCounts:
    """Parameters of each backbone block (and of its BatchNorm layers), counted before a strategy wraps or shards
    them: how many train when some blocks are frozen."""

    def __init__(self, backbone: Any, total: int) -> None:
        self.total = total
        self.sizes: dict[str, tuple[int, int]] = {}
        for block, params in backbone.block_params().items():
            bn = sum(p.numel() for m in batchnorms(backbone.block_modules(block)) for p in m.parameters(recurse=False))
            self.sizes[block] = (sum(p.numel() for _, p in params), bn)

    def trainable(self, frozen: set[str], bn_policy: str) -> int:
        """Parameters the optimizer updates when ``frozen`` blocks are frozen (BatchNorm ones stay frozen under
        ``bn_policy='frozen'`` and train in frozen blocks under ``train_bn``)."""
        def held(block: str, size: int, bn: int) -> int:
            if block in frozen:
                return size - bn if bn_policy == "train_bn" else size
            return bn if bn_policy == "frozen" else 0
        return self.total - sum(held(b, size, bn) for b, (size, bn) in self.sizes.items())
