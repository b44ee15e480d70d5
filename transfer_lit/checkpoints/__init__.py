"""Checkpoints: atomic writes and stale temporary files, whether a checkpoint fits the model, locating
``last``, random-number-generator state, and a checkpoint's hyperparameters on the command line."""

from transfer_lit.checkpoints.compat import check_checkpoint_fits, describe_config
from transfer_lit.checkpoints.hparams import check_config_files, with_checkpoint_model
from transfer_lit.checkpoints.io import (
    AtomicCheckpointIO,
    atomic_torch_save,
    load_torch_file,
    remove_stale_temps,
    temp_path,
)
from transfer_lit.checkpoints.locate import (
    checkpoint_dir,
    checkpoint_folders,
    find_last_checkpoint,
    resolve_last_checkpoint,
    resume_command,
)
from transfer_lit.checkpoints.rng import capture_rng, capture_rng_of_ranks, restore_rng, restore_rng_of_rank
from transfer_lit.checkpoints.state import restore_transfer_state, save_transfer_state

__all__ = [
    "AtomicCheckpointIO",
    "atomic_torch_save",
    "capture_rng",
    "capture_rng_of_ranks",
    "check_checkpoint_fits",
    "check_config_files",
    "checkpoint_dir",
    "checkpoint_folders",
    "describe_config",
    "find_last_checkpoint",
    "load_torch_file",
    "remove_stale_temps",
    "resolve_last_checkpoint",
    "restore_rng",
    "restore_rng_of_rank",
    "restore_transfer_state",
    "resume_command",
    "save_transfer_state",
    "temp_path",
    "with_checkpoint_model",
]
