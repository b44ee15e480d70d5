"""What callbacks, data modules, the feature cache and the LR finder may rely on of the LightningModule (and the
prediction writer of the data module: :class:`SkipsInputs`).

Each is a ``runtime_checkable`` protocol: its users check ``isinstance(module, Protocol)`` once and then
use only what it declares; :class:`~transfer_lit.TransferModule` implements them all. A research
subclass keeps them by calling ``super()`` in the hooks it overrides. :class:`CachedFeatures` is the
batch type the feature cache hands to :meth:`FeatureCacheable.batch_logits`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from transfer_lit.backbones.base import Backbone
    from transfer_lit.evaluation.decision import Decision
    from transfer_lit.freezing.frozen import FrozenBlocks
    from transfer_lit.freezing.strategies import FreezingStrategy
    from transfer_lit.preprocessing import Preprocessing


class CachedFeatures(NamedTuple):
    """A batch of cached backbone features: ``batch_logits`` sends ``features`` to the head directly."""

    features: torch.Tensor
    target: torch.Tensor


@runtime_checkable
class HasPreprocessing(Protocol):
    """A module that says how its inputs must be prepared (the data module builds its transforms from it)."""

    preprocessing: Preprocessing


@runtime_checkable
class Classifier(Protocol):
    """A module whose outputs are scores of named classes (the prediction writer names them)."""

    class_names: list[str]
    num_classes: int
    task: str


@runtime_checkable
class SkipsInputs(Protocol):
    """A data module that may leave predict inputs out (files that are no images, unreadable ones): the prediction
    writer reports them."""

    def take_skipped_inputs(self) -> dict[str, str]:
        """``{input: why it was left out}`` of the predict inputs read; the caller reports them, the data module
        then does not."""


@runtime_checkable
class Unfreezable(Protocol):
    """What :class:`~transfer_lit.ProgressiveUnfreezing` needs: the blocks and the two ways to move them."""

    mode: str
    bn_policy: str
    backbone: Backbone
    frozen: FrozenBlocks

    @property
    def frozen_blocks(self) -> set[str]:
        """Names of the blocks frozen now."""

    def set_frozen_blocks(self, blocks: Iterable[str]) -> None:
        """Freeze exactly ``blocks``; thaw every other backbone block."""

    def set_block_gates(self, gates: Mapping[str, float]) -> None:
        """The learning-rate gate in ``[0, 1]`` of thawed blocks (warm-up), written through ``FrozenBlocks``."""

    @property
    def freezing(self) -> FreezingStrategy:
        """What freezing means under the run's strategy (whether the weights are in one piece, for restore_best)."""


@runtime_checkable
class Freezable(Protocol):
    """What :class:`~transfer_lit.freezing.FreezingHooks` needs: the choice of the freezing strategy
    (``configure_freezing``, the place to inject one), a way to install it, and the frozen blocks it acts on."""

    frozen: FrozenBlocks

    def configure_freezing(self) -> FreezingStrategy:
        """The freezing strategy for the trainer's strategy."""

    def install_freezing(self, strategy: FreezingStrategy) -> None:
        """Freeze through ``strategy`` from now on (refusing a mode it cannot run)."""


@runtime_checkable
class FeatureCacheable(Protocol):
    """What the feature cache needs: whether cached backbone features may stand in for the inputs, and how
    features are computed and turned into logits."""

    mode: str
    backbone: Backbone

    def feature_cache_refusal(self) -> str | None:
        """``None`` when batches may be served from cached features, else why not (in words)."""

    def features(self, inputs: Any) -> torch.Tensor:
        """Pooled backbone features ``(batch, num_features)`` of a batch's inputs."""

    def batch_logits(self, batch: Any) -> torch.Tensor:
        """Logits of a batch (a :class:`CachedFeatures` batch included)."""


@runtime_checkable
class CheckpointState(Protocol):
    """What :mod:`transfer_lit.checkpoints.state` saves and restores besides the weights."""

    preprocessing: Preprocessing
    decision: Decision
    frozen: FrozenBlocks
    class_names: list[str]
    lr_scale: float

    @property
    def frozen_blocks(self) -> set[str]:
        """Names of the blocks frozen now."""

    @property
    def freezing(self) -> FreezingStrategy:
        """The run's freezing strategy."""

    def resolve_preprocessing(self, trained_with: Preprocessing | None = None) -> Preprocessing:
        """The precedence rule, with what a checkpoint was trained with as the declared level."""

    def set_frozen_blocks(self, blocks: Iterable[str]) -> None:
        """Freeze exactly ``blocks``."""


@runtime_checkable
class LRScalable(Protocol):
    """What :class:`~transfer_lit.LRFinder` needs: a global LR multiplier, logits, loss, the freezing strategy."""

    lr_scale: float

    @property
    def freezing(self) -> FreezingStrategy:
        """The run's freezing strategy."""

    def batch_logits(self, batch: Any) -> torch.Tensor:
        """Logits of a batch."""

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss."""
