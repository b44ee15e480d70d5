"""Nothing lost when a run is stopped: interrupt checkpoints, RNG state in checkpoints, ``--ckpt_path last``.

Lightning turns SIGTERM into a clean stop in one process: its handler sets ``trainer.received_sigterm`` and
the loops raise ``SIGTERMException`` (a ``SystemExit`` with exit code 0) at the next batch boundary,
after calling every callback's ``on_exception``. Under DDP (Lightning 2.6) the ranks do not agree on that stop:
the handler itself enters a ``broadcast`` that only the signalled rank joins, wherever that rank happens to be
(``trainer/connectors/signal_connector.py``, ``_sigterm_notifier_fn``: a collective mismatch with the other
ranks' next collective, which crashes or hangs them); the per-step ``_broadcast_sigterm_tensor``
(``loops/training_epoch_loop.py``) carries rank 0's flag only; and ``training_epoch_loop.py`` ``on_advance_end``,
``fit_loop.py`` ``on_advance_end`` and ``evaluation_loop.py`` read each rank's own flag. Ranks stop at different
steps and the collective checkpoint write's barrier never returns. Ctrl-C instead raises ``KeyboardInterrupt``
wherever the main thread happens to be (possibly inside ``optimizer.step()``) and Lightning exits with 1. Neither
writes a checkpoint, and Lightning does not save RNG states. :class:`FaultTolerance`:

* never runs Lightning's SIGTERM handler while training: a SIGTERM or the first Ctrl-C only records a request on
  the rank that got it, and every rank all-reduces the requests (one int) at points all ranks reach together, the
  end of each training batch and of each validation; then every rank sets ``received_sigterm`` at once, so all
  stop after the same batch (a signal to one rank is enough, and signals reaching ranks at different moments
  stop them together). A second Ctrl-C aborts at once, without saving;
* lets a validation that is running finish before stopping: Lightning skips the rest of a validation
  stopped half-way when it resumes, so that epoch's validation metrics would be lost (in one process a second
  SIGTERM stops sooner; under DDP the end of a validation is the first point every rank is sure to reach: ranks
  may run different numbers of validation batches);
* on that stop writes ``interrupted.ckpt`` next to ``ModelCheckpoint``'s files (atomically, with
  :class:`~transfer_lit.checkpoints.AtomicCheckpointIO`) and sets the exit code to 128 + signal number
  (130 for SIGINT, 143 for SIGTERM), as shells report a process killed by that signal;
* saves the torch (CPU and CUDA), numpy and Python RNG states of every rank in every checkpoint and restores each
  rank's own when training resumes (:mod:`transfer_lit.checkpoints.rng`, which also says what a different number
  of ranks gets): resuming from an end-of-epoch checkpoint (``last.ckpt``) gives the same weights, bit
  for bit, as the uninterrupted run, under DDP too. So does a mid-epoch one (``interrupted.ckpt``,
  ``every_n_train_steps``): the data modules' training loaders record where the epoch stands and continue it with
  the same order and the same random crops (:mod:`transfer_lit.data.order`).

:func:`~transfer_lit.checkpoints.find_last_checkpoint` resolves ``ckpt_path="last"`` across logger versions
(Lightning only looks in the new run's own, still empty, version folder).
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from transfer_lit.callbacks.signals import give_back, take_signals
from transfer_lit.checkpoints.locate import checkpoint_dir
from transfer_lit.checkpoints.rng import capture_rng_of_ranks, restore_rng_of_rank

#: Exit codes a shell gives a process killed by the signal.
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class FaultTolerance(Callback):
    """Write a resumable checkpoint when training is stopped by SIGTERM or Ctrl-C; keep RNG states in checkpoints.

    After the stop, ``interrupted_by`` (``SIGINT`` / ``SIGTERM``) and ``checkpoint_path`` say what happened;
    the process exits with 130 (SIGINT) or 143 (SIGTERM). Under DDP a signal to any rank stops every rank after the
    same batch, one checkpoint is written and every rank exits with that code. Resume with
    ``fit --ckpt_path <checkpoint_path>``.

    Args:
        filename: file name of the interrupt checkpoint, written in the ``ModelCheckpoint`` folder.
    """

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"fault tolerance filename must be a file name ending in .ckpt, got {filename!r}")
        self.filename = filename
        self.interrupted_by: str | None = None
        self.checkpoint_path: Path | None = None
        self._previous: dict[int, Any] = {}
        self._requested = 0  # the signal this rank received (0: none)
        self._agreed = False  # every rank knows of a request: the stop is under way
        self._trainer: Trainer | None = None

    # ----------------------------------------------------------------- RNG state

    @override
    def state_dict(self) -> dict[str, Any]:
        # Every rank builds each checkpoint (rank 0 writes it): the gather is a collective they all enter.
        return {"rng": capture_rng_of_ranks()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored at once: Lightning loads callback states just before it builds the train iterator (which
        # prefetches a batch; our data modules' loaders draw no global random number); what runs in between
        # (optimizer restore; the sanity check is skipped on restart and runs under isolate_rng) draws none either.
        if "rng" in state_dict:
            note = restore_rng_of_rank(state_dict["rng"])
            if note:
                rank_zero_info(f"transfer_lit: {note}")

    # ----------------------------------------------------------------- signals

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.interrupted_by, self.checkpoint_path, self._requested, self._agreed = None, None, 0, False
        self._trainer = trainer
        # Lightning installed its SIGTERM handler just before this hook: ours replaces it until training ends.
        self._previous = take_signals(self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes, wherever this rank is: no collective here, only a note.
        trainer = self._trainer
        if self._requested:  # this rank's second signal
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # abort now: the state may be torn, nothing is saved
            if trainer is not None and trainer.world_size == 1:
                _set_received_sigterm(trainer)  # stop inside a validation too
            return
        self._requested = signum
        if trainer is None or self._agreed:  # every rank is stopping already (another rank's signal)
            return
        name = self.interrupted_by = signal.Signals(signum).name
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        if trainer.validating and not trainer.sanity_checking:
            # Lightning cannot resume a validation stopped half-way (it skips the rest and that epoch's val
            # metrics would be missing): finish it, then stop.
            sooner = " (SIGTERM again to stop sooner)" if signum == signal.SIGTERM and trainer.world_size == 1 else ""
            rank_zero_info(f"\n{name}: stopping after this validation and saving a checkpoint{again or sooner}")
        else:
            rank_zero_info(f"\n{name}: stopping after the current batch and saving a checkpoint{again}")

    def _agree(self, trainer: Trainer) -> None:
        """Stop every rank if any rank was signalled. Every rank calls this at the same point (a collective)."""
        requested = self._requested
        # One process: nothing to agree on, and no device value read on the host. Under DDP one int per step (Lightning
        # 2.6 already reads a broadcast flag on the host every step, training_epoch_loop.py _broadcast_sigterm_tensor).
        if trainer.world_size > 1:
            flag = torch.tensor(requested, device=trainer.strategy.root_device)
            requested = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not requested:
            return
        name = signal.Signals(requested).name  # SIGTERM (15) over SIGINT (2) when ranks got different ones
        if not self._agreed and not self._requested:
            rank_zero_info(f"\n{name} on another rank: stopping after the current batch and saving a checkpoint")
        self.interrupted_by, self._agreed = name, True
        _set_received_sigterm(trainer)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Every rank ends every training batch (DDP's gradient all-reduce already needs them in step).
        self._agree(trainer)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._agreed and not trainer.sanity_checking:
            # Agreed on the batch that ends the epoch (or reaches val_check_interval): finish this validation first
            # (Lightning would stop it after its first batch); its end agrees again.
            _set_received_sigterm(trainer, False)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._trainer is not None and not trainer.sanity_checking:  # in fit: every rank ends each validation
            self._agree(trainer)

    def _restore_signals(self) -> None:
        give_back(self._previous)
        self._previous = {}
        self._trainer = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_signals()

    # ----------------------------------------------------------------- the stop

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Ours stay until Lightning's teardown, next, puts back the handlers from before fit: a signal arriving during
        # the save only makes a note (Lightning's handler, put back now, would enter a collective on its own).
        self._previous = {}
        try:
            self._save_on_stop(trainer, exception)
        finally:
            self._trainer = None

    def _save_on_stop(self, trainer: Trainer, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted_by = "SIGINT"  # aborted mid-step: the state may be torn, do not save it
            return
        if not isinstance(exception, SIGTERMException):
            return
        self.interrupted_by = self.interrupted_by or "SIGTERM"
        exception.code = EXIT_CODES[self.interrupted_by]  # Lightning's SIGTERMException exits with 0
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.lightning_module is None:
            rank_zero_info(f"{self.interrupted_by}: stopped outside training; nothing to save")
            return
        path = checkpoint_dir(trainer) / self.filename
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        rank_zero_info(
            f"{self.interrupted_by}: saved a resumable checkpoint at epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step} to {path}; resume with `fit --ckpt_path {path}` (or `--ckpt_path last`)"
        )


def _set_received_sigterm(trainer: Trainer, stop: bool = True) -> None:
    # Lightning's own stop (its loops raise SIGTERMException after the batch or validation that is running), set
    # without its handler, which enters a collective only the signalled rank joins (signal_connector.py).
    trainer._signal_connector.received_sigterm = stop
