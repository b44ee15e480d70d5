"""Nothing lost when a run is stopped: interrupt checkpoints, RNG state in checkpoints, ``--ckpt_path last``.

Lightning already turns SIGTERM into a clean stop: its handler sets ``trainer.received_sigterm`` and
the loops raise ``SIGTERMException`` (a ``SystemExit`` with exit code 0) at the next batch boundary,
after calling every callback's ``on_exception``. Ctrl-C instead raises ``KeyboardInterrupt`` wherever
the main thread happens to be (possibly inside ``optimizer.step()``) and Lightning exits with 1. Neither
writes a checkpoint, and Lightning does not save RNG states. :class:`FaultTolerance`:

* routes the first Ctrl-C of a training run through the same SIGTERM path (a second Ctrl-C stops at once);
* lets a validation that is running finish before stopping: Lightning skips the rest of a validation
  stopped half-way when it resumes, so that epoch's validation metrics would be lost (a second signal
  stops sooner);
* on that stop writes ``interrupted.ckpt`` next to ``ModelCheckpoint``'s files (atomically, with
  :class:`~transfer_lit.checkpoints.AtomicCheckpointIO`) and sets the exit code to 128 + signal number
  (130 for SIGINT, 143 for SIGTERM), as shells report a process killed by that signal;
* saves the torch (CPU and CUDA), numpy and Python RNG states in every checkpoint and restores them when
  training resumes: resuming from an end-of-epoch checkpoint (``last.ckpt``) gives the same weights, bit
  for bit, as the uninterrupted run. From a mid-epoch interrupt checkpoint, Lightning finishes the epoch
  with the remaining number of batches drawn from a new shuffle (the image loader is not resumable).

:func:`~transfer_lit.checkpoints.find_last_checkpoint` resolves ``ckpt_path="last"`` across logger versions
(Lightning only looks in the new run's own, still empty, version folder).
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from transfer_lit.checkpoints.locate import checkpoint_dir
from transfer_lit.checkpoints.rng import capture_rng, restore_rng

#: Exit codes a shell gives a process killed by the signal.
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class FaultTolerance(Callback):
    """Write a resumable checkpoint when training is stopped by SIGTERM or Ctrl-C; keep RNG states in checkpoints.

    After the stop, ``interrupted_by`` (``SIGINT`` / ``SIGTERM``) and ``checkpoint_path`` say what happened;
    the process exits with 130 (SIGINT) or 143 (SIGTERM). Resume with ``fit --ckpt_path <checkpoint_path>``.

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
        self._pending: tuple[int, FrameType | None] | None = None
        self._trainer: Trainer | None = None
        self._lightning_sigterm: Any = None

    # ----------------------------------------------------------------- RNG state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored at once: Lightning loads callback states just before it builds the train iterator (which
        # draws the shuffle seed and prefetches a batch); what runs in between (optimizer restore; the sanity
        # check is skipped on restart and runs under isolate_rng anyway) draws no random numbers.
        if "rng" in state_dict:
            restore_rng(state_dict["rng"])

    # ----------------------------------------------------------------- signals

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.interrupted_by, self.checkpoint_path, self._pending = None, None, None
        self._trainer = trainer
        # Lightning installed its SIGTERM handler just before this hook; ours runs it, at the right moment.
        self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is signal.SIG_IGN:  # started with nohup / as a background job: respect it
                continue
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        trainer = self._trainer
        if self.interrupted_by is not None:  # a second signal: stop now
            if trainer is not None and trainer.global_rank > 0:
                # The terminal's Ctrl-C reached every rank and rank 0's Lightning handler forwards it to the ranks it
                # launched: their second signal is that copy. Rank 0 alone decides to abort (then Lightning kills them).
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop(signum, frame)
            return
        self.interrupted_by = name
        if trainer is not None and trainer.validating and not trainer.sanity_checking:
            # Lightning cannot resume a validation stopped half-way (it skips the rest and that epoch's val
            # metrics would be missing): finish it, then stop.
            rank_zero_info(f"\n{name}: stopping after this validation and saving a checkpoint "
                           f"({'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} again to stop sooner)")
            self._pending = (signum, frame)
            return
        rank_zero_info(f"\n{name}: stopping after the current batch and saving a checkpoint"
                       + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""))
        self._stop(signum, frame)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._pending = None
        if not callable(self._lightning_sigterm):
            raise KeyboardInterrupt
        # Lightning's handler sets trainer.received_sigterm (synchronised across ranks; the loops then raise
        # SIGTERMException at the next batch boundary) and forwards the signal to subprocess-launched ranks.
        self._lightning_sigterm(signum, frame)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is not None:
            self._stop(*self._pending)

    def _restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signum, handler)
        self._previous = {}
        self._trainer = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_signals()

    # ----------------------------------------------------------------- the stop

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_signals()
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
