"""Nothing lost: SIGTERM / Ctrl-C write a resumable checkpoint, a SIGKILL mid-write never corrupts one.

The CLI runs in subprocesses (killed by real signals from outside) and in-process (signals sent by a
callback at an exact batch, for the cases that need precise timing). A run is checked by its CSVLogger
metrics across all logger versions: every epoch validated exactly once, every training step once.
"""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from transfer_lit.checkpoints import capture_rng, find_last_checkpoint, restore_rng
from transfer_lit.checkpoints.io import AtomicCheckpointIO, temp_path
from transfer_lit.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 6  # 3 classes x 8 training images, batch size 4


@pytest.fixture(autouse=True)
def _ctrl_c_enabled() -> Any:
    """Ctrl-C works in these tests even when pytest itself runs as a background job or under nohup.

    Those start with SIGINT ignored, which FaultTolerance rightly leaves ignored (and child processes
    inherit); the tests that send SIGINT would then see runs that never stop. Python's own handler here
    also gives the subprocesses the default disposition back (a handler is reset to it by exec).
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("interrupts") / "images", {"train": 8, "val": 4}, size=20)


def fit_args(images: Path, run_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "fit", "--data.root", str(images), "--data.batch_size", "4", "--data.num_workers", "0",
        "--model.backbone", "cli_tiny_backbone.TinyCLIBackbone",
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run_dir),
        *extra,
    ]


def versions(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def assert_continuous(run_dir: Path, epochs: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> None:
    """Across every logger version: each epoch validated once, in order; each training step logged once."""
    val_epochs, steps = [], []
    for version in versions(run_dir):
        with (version / "metrics.csv").open() as f:
            for row in csv.DictReader(f):
                if row.get("val_acc"):
                    val_epochs.append(int(row["epoch"]))
                if row.get("train_loss_step"):
                    steps.append(int(row["step"]))
    assert val_epochs == list(range(epochs))
    assert steps == list(range(epochs * steps_per_epoch))


def final_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(versions(run_dir)[-1] / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")


# ----------------------------------------------------------------- real signals, real processes


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TRANSFER_LIT_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=_env(), cwd=log.parent)


def _signal_when(process: subprocess.Popen[bytes], ready: Path, signum: int, timeout: float = 120.0,
                 newer_than: float | None = None) -> int:
    """Send ``signum`` once ``ready`` exists (and was written after ``newer_than``, a modification time)."""
    deadline = time.monotonic() + timeout
    while not ready.is_file() or (newer_than is not None and ready.stat().st_mtime_ns <= newer_than):
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {ready} appeared"
        assert time.monotonic() < deadline, f"{ready} did not appear within {timeout} s"
        time.sleep(0.05)
    process.send_signal(signum)
    return process.wait(timeout=timeout)


def test_sigterm_then_ctrl_c_then_resume_completes_the_run(images: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    epochs, run_dir = 4, tmp_path / "run"
    cli = [sys.executable, "-m", "transfer_lit"]
    slow = ("--model.backbone.delay", "0.1")  # each forward sleeps: an epoch takes ~1 s, long enough to hit
    first = _start([*cli, *fit_args(images, run_dir, epochs, *slow)], tmp_path / "first.log")
    assert _signal_when(first, run_dir / "lightning_logs/version_0/checkpoints/last.ckpt", signal.SIGTERM) == 143
    log = (tmp_path / "first.log").read_text()
    interrupted = run_dir / "lightning_logs/version_0/checkpoints/interrupted.ckpt"
    assert interrupted.is_file() and "Traceback" not in log
    # The message ends with the exact command to resume; run it as printed.
    resume = shlex.split(log[log.index("resume with:\n") :].splitlines()[1])
    assert resume[0] == "transfer-lit" and resume[-2:] == ["--ckpt_path", str(interrupted)]
    last = run_dir / "lightning_logs/version_0/checkpoints/last.ckpt"
    written = last.stat().st_mtime_ns
    second = _start([*cli, *resume[1:]], tmp_path / "second.log")  # resumes in its own folder, version_0
    assert _signal_when(second, last, signal.SIGINT, newer_than=written) == 130
    assert "SIGINT: training stopped and saved" in (tmp_path / "second.log").read_text()

    main(fit_args(images, run_dir, epochs, "--ckpt_path", "last"))  # in-process: spares a third start-up
    assert f"--ckpt_path last = {interrupted}" in capsys.readouterr().err
    assert [v.name for v in versions(run_dir)] == ["version_0"]  # one run folder, one learning curve
    assert_continuous(run_dir, epochs)
    final = final_checkpoint(run_dir)
    assert (final["epoch"], final["global_step"]) == (epochs - 1, epochs * STEPS_PER_EPOCH)


def test_ctrl_c_to_every_ddp_rank_saves_a_checkpoint_and_exits_130(images: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group: every rank, and then rank 0's Lightning handler
    forwards a copy to the rank it launched. That copy must not abort rank 1 (it did: exit 1, no checkpoint;
    the same with SIGTERM sent to the group hung)."""
    run_dir = tmp_path / "run"
    ddp = ("--model.backbone.delay", "0.1", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    env = {k: v for k, v in _env().items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    log = tmp_path / "ddp.log"
    process = subprocess.Popen([sys.executable, "-m", "transfer_lit", *fit_args(images, run_dir, 6, *ddp)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"},
                               cwd=tmp_path, start_new_session=True)  # its own group, signalled as a terminal does
    try:
        ready, deadline = run_dir / "lightning_logs/version_0/checkpoints/last.ckpt", time.monotonic() + 240
        while not ready.is_file():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        # Into the next epoch's steps (0.1 s each): a signal while the ranks are still in the checkpoint write's barrier
        # can hang them, which is issue 13 item 18 (open); seen once in three full suite runs when signalled at once.
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert (run_dir / "lightning_logs/version_0/checkpoints/interrupted.ckpt").is_file()
    assert "Traceback" not in log.read_text()


# ----------------------------------------------------------------- signals at an exact batch, in-process


def _stop_with(images: Path, run_dir: Path, epochs: int, **send: Any) -> SystemExit:
    options = [f"--trainer.callbacks.{key}={value}" for key, value in send.items()]
    with pytest.raises(SystemExit) as stop:
        main(fit_args(images, run_dir, epochs, "--trainer.callbacks+=cli_tiny_backbone.SendSignal", *options))
    return stop.value


def test_sigterm_during_validation_finishes_it_and_the_resumed_run_is_continuous(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lightning skips the rest of a validation stopped half-way when it resumes: that epoch would have no val row.
    stop = _stop_with(images, tmp_path, 3, signum=int(signal.SIGTERM), epoch=1, stage="validate", batch=0)
    assert stop.code == 143
    saved = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/interrupted.ckpt", weights_only=False)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH  # stopped at the end of epoch 1, validation included
    assert "SIGTERM: training stopped and saved" in capsys.readouterr().err
    main(fit_args(images, tmp_path, 3, "--ckpt_path", "last"))
    assert_continuous(tmp_path, 3)


def test_second_ctrl_c_aborts_at_once_without_saving(images: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    stop = _stop_with(images, tmp_path, 2, signum=int(signal.SIGINT), epoch=0, stage="train", batch=1, count=2)
    assert stop.code == 130
    assert not (tmp_path / "lightning_logs/version_0/checkpoints/interrupted.ckpt").exists()
    assert "stopped without saving a new checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C handling given back


def test_an_ignored_sigint_stays_ignored(images: Path, tmp_path: Path) -> None:
    """Started under nohup or as a background job (SIGINT ignored), a Ctrl-C does not stop the run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the autouse fixture restores the handler afterwards
    send = {"signum": int(signal.SIGINT), "epoch": 0, "batch": 1}
    options = [f"--trainer.callbacks.{key}={value}" for key, value in send.items()]
    main(fit_args(images, tmp_path, 2, "--trainer.callbacks+=cli_tiny_backbone.SendSignal", *options))
    assert not (tmp_path / "lightning_logs/version_0/checkpoints/interrupted.ckpt").exists()
    assert final_checkpoint(tmp_path)["global_step"] == 2 * STEPS_PER_EPOCH  # it ran to the end
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# ----------------------------------------------------------------- exact resume and atomic writes


class _BlockWhilePickled:
    """Pickling this (inside torch.save) announces it through ``flag`` and then hangs, to be killed mid-write."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple[Any, ...]:
        self.flag.write_text("writing")
        time.sleep(120)
        raise AssertionError("should have been killed")


def _write_forever(path: Path, flag: Path) -> None:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "x": _BlockWhilePickled(flag)}, path)


def _kill_during_write(path: Path, tmp_path: Path) -> Path:
    flag = tmp_path / "writing"
    child = multiprocessing.get_context("fork").Process(target=_write_forever, args=(path, flag))
    child.start()
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    return path.with_name(f".{path.name}.{child.pid}.tmp")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_mid_write_keeps_last_and_resuming_it_equals_the_uninterrupted_run(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(fit_args(images, tmp_path / "straight", 3))
    main(fit_args(images, tmp_path / "resumed", 2))
    last = tmp_path / "resumed/lightning_logs/version_0/checkpoints/last.ckpt"
    before = _sha(last)

    partial = _kill_during_write(last, tmp_path)
    assert partial.is_file()  # the killed write's temp file is left behind ...
    assert _sha(last) == before  # ... and last.ckpt is untouched
    assert torch.load(last, weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH

    capsys.readouterr()
    main(fit_args(images, tmp_path / "resumed", 3, "--ckpt_path", "last"))
    err = capsys.readouterr().err
    assert f"--ckpt_path last = {last}" in err and f"removed {partial}, the partial write" in err
    assert not partial.exists()
    # Weights, optimizer and RNG state resume exactly: the same shuffles and crops, bit for bit.
    straight, resumed = final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed")
    assert straight["global_step"] == resumed["global_step"] == 3 * STEPS_PER_EPOCH
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert_continuous(tmp_path / "resumed", 3)


def test_atomic_write_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    io.save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 2}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temp file left
    assert temp_path(target).parent == target.parent  # same filesystem: os.replace is atomic


def test_find_last_checkpoint_prefers_the_newest_across_versions(images: Path, tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    old = tmp_path / "lightning_logs/version_0/checkpoints"
    new = tmp_path / "lightning_logs/version_1/checkpoints"
    for folder in (old, new):
        folder.mkdir(parents=True)
    (old / "last.ckpt").write_bytes(b"0")
    time.sleep(0.01)
    (new / "interrupted.ckpt").write_bytes(b"1")
    (new / ".last.ckpt.123.tmp").write_bytes(b"partial")
    trainer = Trainer(logger=CSVLogger(tmp_path), default_root_dir=tmp_path)
    assert find_last_checkpoint(trainer) == new / "interrupted.ckpt"


def test_find_last_checkpoint_takes_the_most_trained_of_the_run_not_the_newest(tmp_path: Path) -> None:
    """By modification time, a stale interrupted.ckpt (touched, or copied since) beat a last.ckpt that trained
    further, and the reverse: the training that came after it was lost."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    folder = tmp_path / "lightning_logs/version_0/checkpoints"
    folder.mkdir(parents=True)
    last, interrupted = folder / "last.ckpt", folder / "interrupted.ckpt"

    def save(path: Path, global_step: int, epoch: int, mtime: float) -> None:
        torch.save({"global_step": global_step, "epoch": epoch, "state_dict": {"w": torch.zeros(4)}}, path)
        os.utime(path, (mtime, mtime))

    trainer = Trainer(logger=CSVLogger(tmp_path), default_root_dir=tmp_path, enable_progress_bar=False)
    save(last, 700, 6, mtime=1_000)
    save(interrupted, 500, 5, mtime=2_000)  # older training, newer file
    assert find_last_checkpoint(trainer) == last
    save(interrupted, 750, 6, mtime=500)  # stopped mid-epoch after last.ckpt: further on, though older
    assert find_last_checkpoint(trainer) == interrupted
    save(interrupted, 700, 6, mtime=1_500)  # the same progress: the newer
    assert find_last_checkpoint(trainer) == interrupted
    interrupted.write_bytes(b"not a checkpoint")  # unreadable: no progress
    assert find_last_checkpoint(trainer) == last


def test_rng_state_round_trips_and_loads_with_weights_only(tmp_path: Path) -> None:
    state = capture_rng()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(state, tmp_path / "rng.pt")  # LightningCLI reads checkpoints with weights_only=True
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_resume_from_mid_epoch_equals_the_uninterrupted_run(images: Path, tmp_path: Path, workers: str) -> None:
    """Stopped after batch 2 of epoch 1 (of 6), the resumed run trains the epoch's other 3 batches, of the same
    shuffle and with the same random crops, and ends with the uninterrupted run's weights, bit for bit."""
    loader = ("--data.num_workers", workers)
    main(fit_args(images, tmp_path / "straight", 3, *loader))
    with pytest.raises(SystemExit) as stop:
        main(fit_args(images, tmp_path / "resumed", 3, *loader, "--trainer.callbacks+=cli_tiny_backbone.SendSignal",
                      f"--trainer.callbacks.signum={int(signal.SIGTERM)}", "--trainer.callbacks.epoch=1",
                      "--trainer.callbacks.batch=2"))
    assert stop.value.code == 143
    saved = torch.load(tmp_path / "resumed/lightning_logs/version_0/checkpoints/interrupted.ckpt", weights_only=False)
    assert saved["global_step"] == STEPS_PER_EPOCH + 3  # mid-epoch
    main(fit_args(images, tmp_path / "resumed", 3, *loader, "--ckpt_path", "last"))
    straight, resumed = final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed")
    assert straight["global_step"] == resumed["global_step"] == 3 * STEPS_PER_EPOCH
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert_continuous(tmp_path / "resumed", 3)


def test_the_same_weights_with_any_number_of_loader_workers(images: Path, tmp_path: Path) -> None:
    """Each image's random crop is seeded by (seed, epoch, image), not by the worker that decodes it, and no loader
    takes a number from the global RNG that the head's dropout draws from (before: a validation loader without
    persistent workers drew one at every start, so with dropout the weights differed from the second epoch on)."""
    dropout = ("--model.head", "transfer_lit.LinearHead", "--model.head.dropout", "0.5")
    main(fit_args(images, tmp_path / "none", 3, "--data.num_workers", "0", *dropout))
    main(fit_args(images, tmp_path / "two", 3, "--data.num_workers", "2", *dropout))
    none, two = final_checkpoint(tmp_path / "none"), final_checkpoint(tmp_path / "two")
    for key, value in none["state_dict"].items():
        assert torch.equal(value, two["state_dict"][key]), key


def test_a_resume_from_an_every_n_train_steps_checkpoint_equals_the_uninterrupted_run(images: Path,
                                                                                      tmp_path: Path) -> None:
    """A ModelCheckpoint saving at step 4 (batch 4 of epoch 0's 6, inside on_train_batch_end): resumed from it, the
    run trains the epoch's last 2 batches and ends with the uninterrupted run's weights."""
    every = ("--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=4",
             "--trainer.callbacks.save_top_k=-1", f"--trainer.callbacks.dirpath={tmp_path / 'steps'}")
    main(fit_args(images, tmp_path / "straight", 2, *every))
    at_4 = next((tmp_path / "steps").glob("*step=4.ckpt"))
    main(fit_args(images, tmp_path / "resumed", 2, "--ckpt_path", str(at_4)))
    straight, resumed = final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed")
    assert straight["global_step"] == resumed["global_step"] == 2 * STEPS_PER_EPOCH
    assert [k for k, v in straight["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])] == []
