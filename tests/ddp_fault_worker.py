"""One rank of a two-process CPU (gloo) ``transfer-lit fit``, started from outside as torchrun and SLURM start ranks.

    LOCAL_RANK=r NODE_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/ddp_fault_worker.py fit ...

With ``LOCAL_RANK`` set Lightning launches no processes of its own, so a test can signal each rank separately and
read each rank's exit code (:func:`start_ranks`, for tests/test_ddp_faults.py). The callbacks below are named on
the command line (``--trainer.callbacks+=ddp_fault_worker.Probe``): :class:`Probe` tells the test when to send a
signal, at which step each rank stopped and what each rank trained on, after its augmentation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

TESTS = Path(__file__).resolve().parent


class Probe(Callback):
    """What a test needs to see of one rank, in files under ``folder`` (``<r>``: the global rank).

    * ``ready<r>``: written after the training batch that reaches global step ``ready_step``: send the signal now;
    * ``stopped<r>``: the global step at which this rank stopped on an exception (a signal);
    * ``batches<r>.json``: ``{global step: sum of the training batch's inputs}``, what this rank trained on after its
      random augmentation (appended to across runs in the same folder);
    * ``last-epoch<k>.ckpt`` (rank 0): a copy of ``last.ckpt`` as it was at the end of epoch ``keep_epoch``.

    It also sends its own process SIGTERM at an exact point: in the training batch of global step ``sigterm_step``,
    each rank in ``sigterm_at`` at its hook there (``train_batch_start``: before the forward pass;
    ``before_optimizer_step``: after the backward pass and its gradient all-reduce). ``signal.raise_signal`` runs
    the handler before it returns, so each rank is signalled at a known, different point of the same step.

    Args:
        folder: where the files go.
        ready_step: global step after which ``ready<r>`` is written (``None``: never).
        keep_epoch: epoch whose ``last.ckpt`` is kept (``None``: none).
        sigterm_step: global step whose training batch is signalled (``None``: none).
        sigterm_at: ``{rank: hook}``, the ranks signalled and where.
    """

    def __init__(self, folder: str, ready_step: int | None = None, keep_epoch: int | None = None,
                 sigterm_step: int | None = None, sigterm_at: dict[int, str] | None = None) -> None:
        self.folder, self.ready_step, self.keep_epoch = Path(folder), ready_step, keep_epoch
        self.sigterm_step, self.sigterm_at = sigterm_step, sigterm_at or {}
        self.sums: dict[int, float] = {}

    def _maybe_sigterm(self, trainer: Trainer, hook: str) -> None:
        if trainer.global_step == self.sigterm_step and self.sigterm_at.get(trainer.global_rank) == hook:
            self.sigterm_step = None
            signal.raise_signal(signal.SIGTERM)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.sums[trainer.global_step] = float(batch[0].double().sum())
        self._maybe_sigterm(trainer, "train_batch_start")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._maybe_sigterm(trainer, "before_optimizer_step")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.ready_step:
            (self.folder / f"ready{trainer.global_rank}").write_text(str(trainer.global_step))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.keep_epoch is not None and trainer.current_epoch == self.keep_epoch + 1 and trainer.is_global_zero:
            last = next(Path(c.dirpath) / "last.ckpt" for c in trainer.checkpoint_callbacks
                        if isinstance(c, ModelCheckpoint) and c.filename == "last")
            shutil.copyfile(last, self.folder / f"last-epoch{self.keep_epoch}.ckpt")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        (self.folder / f"stopped{trainer.global_rank}").write_text(str(trainer.global_step))
        self._write_sums(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_sums(trainer)

    def _write_sums(self, trainer: Trainer) -> None:
        path = self.folder / f"batches{trainer.global_rank}.json"
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**earlier, **{str(k): v for k, v in self.sums.items()}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(args: list[str], logs: Path, world: int = 2) -> list[subprocess.Popen[bytes]]:
    """``world`` processes of this script on ``args``, one per rank, each in its own process group, logging to
    ``logs/rank<r>.log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_", "TORCHELASTIC"))}
    path = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(PYTHONPATH=path, TRANSFER_LIT_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world), NODE_RANK="0")
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], cwd=logs,
                             stdout=(logs / f"rank{r}.log").open("ab"), stderr=subprocess.STDOUT,
                             env={**env, "LOCAL_RANK": str(r)}, start_new_session=True)
            for r in range(world)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    from transfer_lit.cli import main

    main(sys.argv[1:])
