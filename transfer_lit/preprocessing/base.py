"""What a checkpoint expects of its inputs, for any modality, and the one precedence rule that resolves it.

Each modality has a frozen dataclass subclass of :class:`Preprocessing` (images: resize, crop,
interpolation, mean, std; text: the tokenizer and its limits) registered under its ``modality`` name.
:func:`resolve_preprocessing` applies *explicit override > what the weights declare > defaults*, field
by field. The result is logged, saved in the checkpoint (``to_dict``, tagged with the modality) and
read back with :meth:`Preprocessing.from_dict`, so ``predict`` after a reload prepares inputs exactly
as training did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

_REGISTRY: dict[str, type[Preprocessing]] = {}
_P = TypeVar("_P", bound="type[Preprocessing]")


def register_preprocessing(cls: _P) -> _P:
    """Class decorator: make ``cls`` the preprocessing of ``cls.modality`` (for :meth:`Preprocessing.from_dict`)."""
    _REGISTRY[cls.modality] = cls
    return cls


class Preprocessing:
    """Base of every modality's preprocessing; subclasses are frozen dataclasses with a ``modality`` name."""

    modality: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-friendly form with its ``modality`` (what checkpoints and the feature cache store)."""
        return {"modality": self.modality, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`. On the base class the ``modality`` key picks the subclass (``image`` when
        absent, as in checkpoints written before there was more than one); unknown keys are an error that lists
        the valid ones."""
        values = dict(values)
        modality = values.pop("modality", None) or (cls.modality or "image")
        target = _REGISTRY.get(modality) if cls is Preprocessing else cls
        if target is None:
            raise ValueError(f"preprocessing.modality={modality!r} is unknown; valid: {sorted(_REGISTRY)}")
        if cls is not Preprocessing and modality != cls.modality:
            raise ValueError(f"preprocessing.modality={modality!r} but {cls.__name__} is for {cls.modality!r} inputs")
        valid = {f.name for f in dataclasses.fields(target)}  # type: ignore[arg-type]
        unknown = set(values) - valid
        if unknown:
            raise ValueError(f"unknown preprocessing key(s) {sorted(unknown)}; valid keys are {sorted(valid)}")
        return target(**values)

    def merged(self, override: Mapping[str, Any]) -> Preprocessing:
        """This preprocessing with the fields of ``override`` replaced (a modality may adjust fields that depend on
        others: text recomputes the tokenizer's hash when the tokenizer changes)."""
        return type(self).from_dict({**self.to_dict(), **override})

    def check_checkpoint(self, trained_with: Preprocessing) -> None:
        """Raise when inputs prepared by this preprocessing cannot be fed to weights trained with ``trained_with``
        (default: accept; text refuses a different tokenizer)."""

    def check_inputs(self, inputs: Any) -> None:
        """Raise a clear error when a batch's inputs cannot have been prepared by this preprocessing (default:
        accept anything). Called by the module on every batch, so it must not read device values."""


def resolve_preprocessing(
    override: Mapping[str, Any] | Preprocessing | None,
    declared: Preprocessing | None,
    default: Preprocessing,
) -> Preprocessing:
    """The precedence rule: explicit override > what the weights declare > default, field by field.

    Args:
        override: fields the user set explicitly (a partial dict is fine, e.g. ``{"crop_size": 160}``);
            ``None`` values are left to the next level.
        declared: what the backbone's weights declare (or, after a reload, what the checkpoint was trained with).
        default: used when nothing is declared (a random-init or home-made network).
    """
    base = declared if declared is not None else default
    if override is None:
        return base
    values = override.to_dict() if isinstance(override, Preprocessing) else dict(override)
    modality = values.pop("modality", None)
    if modality is not None and modality != base.modality:
        raise ValueError(f"model.preprocessing is for {modality!r} inputs but the backbone takes {base.modality!r}")
    return base.merged({k: v for k, v in values.items() if v is not None})
