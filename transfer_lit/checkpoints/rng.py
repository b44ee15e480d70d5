"""Random-number-generator state in checkpoints: torch (CPU and CUDA), numpy and Python, of every rank.

Under DDP each rank draws its own random numbers (its own augmentations of its own images), so a checkpoint holds one
state per rank, indexed by global rank (:func:`capture_rng_of_ranks`), and each rank restores its own
(:func:`restore_rng_of_rank`). Resumed with a different number of ranks, the ranks the checkpoint has a state for
restore it; the others are reseeded from rank 0's state and their rank: deterministic (the same resume twice draws
the same numbers) and different on every rank. A checkpoint holding a single state (written by one process, or by
transfer_lit before states were kept per rank) is rank 0's.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def capture_rng() -> dict[str, Any]:
    """The torch (CPU, every CUDA device), numpy and Python RNG states, as plain types and tensors."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *(v for v in np_state[2:])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; CUDA states are restored when this process has the same devices."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _world() -> tuple[int, int]:
    """This process's global rank and the number of ranks (0 and 1 without a torch.distributed process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def capture_rng_of_ranks() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng`, indexed by global rank.

    A collective under torch.distributed (an all-gather): every rank must call it, as every rank builds each
    checkpoint in Lightning (``trainer.save_checkpoint`` runs ``dump_checkpoint`` everywhere, rank 0 writes).
    """
    state = capture_rng()
    _, world = _world()
    if world == 1:
        return [state]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng_of_rank(saved: list[dict[str, Any]] | dict[str, Any]) -> str | None:
    """Restore this rank's own state from :func:`capture_rng_of_ranks`'s list (or a single state: rank 0's).

    Returns a note, the same on every rank, when the checkpoint holds states of a different number of ranks.
    """
    states = [saved] if isinstance(saved, dict) else list(saved)
    rank, world = _world()
    if rank < len(states):
        restore_rng(states[rank])
    else:
        # Seeded from what the checkpoint holds, so a rerun of the same resume draws the same numbers.
        base = int(torch.randint(2**31, (1,), generator=torch.Generator().set_state(states[0]["torch"])))
        seed = base + rank
        torch.manual_seed(seed)  # every CUDA device too
        np.random.seed(seed % 2**32)
        random.seed(seed)
    if len(states) == world:
        return None
    note = (f"the checkpoint holds the RNG states of {len(states)} rank(s), this run has {world}: "
            f"{_ranks(0, min(len(states), world))} restored")
    if world > len(states):
        return f"{note}, {_ranks(len(states), world)} reseeded from rank 0's state and the rank"
    return f"{note}, the states of {_ranks(world, len(states))} left unused"


def _ranks(first: int, end: int) -> str:
    return f"rank {first}" if end - first == 1 else f"ranks {first}-{end - 1}"
