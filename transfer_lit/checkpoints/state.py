"""What a TransferModule keeps in a checkpoint besides its weights, and how it is restored.

``checkpoint["transfer_lit"]`` holds the preprocessing the weights were trained with (tagged with its
modality), the class names (the copy that wins on reload: the hyperparameters' copy is only what the
command line started from), the frozen blocks and the LR finder's ``lr_scale``. The checkpoint is
checked against the model first (:func:`~transfer_lit.checkpoints.check_checkpoint_fits`).
"""

from __future__ import annotations

from typing import Any

from transfer_lit.backbones.base import REGEX_PREFIX
from transfer_lit.checkpoints.compat import check_checkpoint_fits
from transfer_lit.preprocessing import Preprocessing
from transfer_lit.protocols import CheckpointState


def save_transfer_state(module: CheckpointState, checkpoint: dict[str, Any]) -> None:
    """Add ``module``'s preprocessing, class names, frozen (and regex-carved) blocks, ``lr_scale`` and decision
    (temperature, threshold) to ``checkpoint``."""
    checkpoint["transfer_lit"] = {
        "preprocessing": module.preprocessing.to_dict(),
        "class_names": list(module.class_names),
        "frozen_blocks": sorted(module.frozen_blocks),
        "carved_blocks": sorted(module.frozen.backbone.carved_blocks()),
        "lr_scale": module.lr_scale,
        "decision": module.decision.state_dict(),
    }


def restore_transfer_state(module: CheckpointState, checkpoint: dict[str, Any]) -> None:
    """Check that ``checkpoint`` fits ``module`` (unless the strategy shards the tensors), then restore what
    :func:`save_transfer_state` saved; an explicit ``model.preprocessing`` still wins over the saved one."""
    if module.freezing.compares_checkpoint_shapes:
        check_checkpoint_fits(checkpoint, module)  # type: ignore[arg-type]
    state = checkpoint.get("transfer_lit")
    if state is None:
        return
    trained_with = Preprocessing.from_dict(state["preprocessing"])
    module.preprocessing = module.resolve_preprocessing(trained_with)
    module.preprocessing.check_checkpoint(trained_with)
    module.class_names = list(state["class_names"])
    module.lr_scale = float(state["lr_scale"])
    module.decision.load_state_dict(state.get("decision", {}))
    carved = {b: b[len(REGEX_PREFIX):] for b in state.get("carved_blocks", [])
              if b.startswith(REGEX_PREFIX) and b not in module.frozen.names}
    if carved:  # blocks a schedule's regex entries carved: a command without the schedule (predict) carves them too
        module.frozen.carve(carved)
    module.set_frozen_blocks(state["frozen_blocks"])
