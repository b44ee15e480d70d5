"""Two-rank DDP on CPU (gloo), stopped by SIGTERM and resumed: issue 13 items 18 and 19.

The ranks run ``transfer-lit fit`` and are started from outside, as torchrun and SLURM start them
(tests/ddp_fault_worker.py): each can be signalled on its own and each rank's exit code is read. A signal
to rank 0 alone, or to every rank at slightly different moments (as ``srun`` delivers ``--signal``), must stop
every rank at the same step, write one ``interrupted.ckpt`` and exit 143 everywhere; a hang fails on a timeout.
A resumed run must equal the uninterrupted one bit for bit, with every rank drawing its own augmentations.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from ddp_fault_worker import start_ranks
from PIL import Image
from test_fault_tolerance import assert_continuous, fit_args, versions

from transfer_lit.checkpoints import capture_rng, capture_rng_of_ranks, restore_rng, restore_rng_of_rank

pytestmark = pytest.mark.filterwarnings("ignore")

STEPS_PER_EPOCH = 3  # 3 classes x 8 training images, batch size 4, on each of 2 ranks
CHECKPOINTS = "lightning_logs/version_0/checkpoints"
#: Sizes the training images cycle through: RandomResizedCrop's retry loop draws a number of random values that depends
#: on the image's aspect ratio, so the two ranks' random streams part (the CLI seeds every rank with 0: with images
#: of one size both ranks would draw the same numbers and restoring rank 0's state everywhere would look right).
SIZES = [(20, 20), (40, 14), (14, 36), (26, 20), (18, 40)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("ddp_faults") / "images", {"train": 8, "val": 4}, size=20)
    for i, path in enumerate(sorted((root / "train").rglob("*.png"))):
        Image.open(path).resize(SIZES[i % len(SIZES)]).save(path)
    return root


def ddp_args(images: Path, run_dir: Path, epochs: int, probe: Path, *extra: str) -> list[str]:
    return fit_args(images, run_dir, epochs, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--trainer.callbacks+=ddp_fault_worker.Probe", f"--trainer.callbacks.folder={probe}", *extra)


def logs(folder: Path, tail: int = 4000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(folder.glob("rank*.log")))


def wait_for(path: Path, ranks: list[subprocess.Popen[bytes]], log_dir: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert all(p.poll() is None for p in ranks), f"a rank ended before {path.name} appeared:\n{logs(log_dir)}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s:\n{logs(log_dir)}"
        time.sleep(0.02)


def exit_codes(ranks: list[subprocess.Popen[bytes]], log_dir: Path, timeout: float) -> list[int]:
    """Every rank's exit code; a rank still running after ``timeout`` seconds (a hang) fails the test."""
    deadline = time.monotonic() + timeout
    try:
        for rank in ranks:
            rank.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank still runs {timeout} s later (hung): {[p.poll() for p in ranks]}\n{logs(log_dir)}")
    return [int(p.returncode) for p in ranks]


@contextlib.contextmanager
def running(args: list[str], log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The ranks of a run on ``args``; any still running at the end is killed."""
    ranks = start_ranks(args, log_dir)
    try:
        yield ranks
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)
                rank.wait()


def run_ranks(args: list[str], log_dir: Path, timeout: float = 240.0) -> None:
    with running(args, log_dir) as ranks:
        assert exit_codes(ranks, log_dir, timeout) == [0, 0], logs(log_dir)


# ----------------------------------------------------------------- item 18: SIGTERM under DDP


@pytest.mark.parametrize("every_rank", [False, True], ids=["rank-0-only", "every-rank"])
def test_sigterm_stops_every_rank_at_one_step_saves_once_exits_143_and_resumes(
    images: Path, tmp_path: Path, every_rank: bool
) -> None:
    """rank-0-only: rank 0 gets SIGTERM from outside, rank 1 never does (torchrun, or a ``kill`` of one process).
    every-rank: each rank gets it at a different point of the same step, as ``srun`` delivers ``--signal`` to ranks
    that are never in lockstep: rank 1 before its forward pass, rank 0 after its backward pass."""
    epochs, run_dir, probe = 4, tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    # Each forward pass sleeps, so that steps last long enough to be hit; ready0 appears after step 4, in epoch 1.
    slow = ["--model.backbone.delay", "0.1", "--trainer.callbacks.ready_step=4"]
    if every_rank:
        slow += ["--trainer.callbacks.sigterm_step=5",
                 "--trainer.callbacks.sigterm_at={1: train_batch_start, 0: before_optimizer_step}"]
    with running(ddp_args(images, run_dir, epochs, probe, *slow), tmp_path / "logs") as ranks:
        wait_for(probe / "ready0", ranks, tmp_path / "logs")
        if not every_rank:
            ranks[0].send_signal(signal.SIGTERM)
        assert exit_codes(ranks, tmp_path / "logs", timeout=60) == [143, 143], logs(tmp_path / "logs")

    interrupted = run_dir / CHECKPOINTS / "interrupted.ckpt"
    saved = torch.load(interrupted, weights_only=True, map_location="cpu")
    stopped = [int((probe / f"stopped{r}").read_text()) for r in (0, 1)]
    assert stopped == [saved["global_step"]] * 2 and 4 <= saved["global_step"] < epochs * STEPS_PER_EPOCH
    rng = next(v for k, v in saved["callbacks"].items() if k.startswith("FaultTolerance"))["rng"]
    assert isinstance(rng, list) and len(rng) == 2  # one RNG state per rank
    text = logs(tmp_path / "logs", tail=10**6)
    assert "Traceback" not in text and text.count("training stopped and saved; resume with:\n  transfer-lit fit") == 2

    run_ranks(ddp_args(images, run_dir, epochs, probe, "--ckpt_path", str(interrupted)), tmp_path / "resume")
    final = torch.load(versions(run_dir)[-1] / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert (final["epoch"], final["global_step"]) == (epochs - 1, epochs * STEPS_PER_EPOCH)
    assert_continuous(run_dir, epochs, STEPS_PER_EPOCH)


# ----------------------------------------------------------------- item 19: exact resume under DDP


@pytest.mark.slow  # the mid-epoch resume below checks the same (weights and each rank's batches) from further in
def test_two_rank_resume_from_last_equals_the_uninterrupted_run_bitwise(images: Path, tmp_path: Path) -> None:
    """The straight run keeps its ``last.ckpt`` of epoch 1; a new run resumes from it. Rank 1 draws its own
    augmentations again only if the checkpoint holds (and restores) its own RNG state, not rank 0's."""
    epochs, straight, resumed = 3, tmp_path / "straight", tmp_path / "resumed"
    for probe in (straight, resumed):
        probe.mkdir()
    run_ranks(ddp_args(images, straight, epochs, straight, "--trainer.callbacks.keep_epoch=1"), tmp_path / "logs1")
    last = straight / "last-epoch1.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH
    run_ranks(ddp_args(images, resumed, epochs, resumed, "--ckpt_path", str(last)), tmp_path / "logs2")

    for rank in (0, 1):  # what each rank trained on in epoch 2, after augmentation
        seen = [json.loads((folder / f"batches{rank}.json").read_text()) for folder in (straight, resumed)]
        steps = [str(s) for s in range(2 * STEPS_PER_EPOCH, epochs * STEPS_PER_EPOCH)]
        assert [seen[0][s] for s in steps] == [seen[1][s] for s in steps], f"rank {rank}"
    a, b = (torch.load(versions(run)[-1] / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
            for run in (straight, resumed))
    assert a["global_step"] == b["global_step"] == epochs * STEPS_PER_EPOCH
    different = {k: float((v - b["state_dict"][k]).abs().max()) for k, v in a["state_dict"].items()
                 if not torch.equal(v, b["state_dict"][k])}
    assert different == {}


def test_two_rank_resume_from_mid_epoch_equals_the_uninterrupted_run_bitwise(images: Path, tmp_path: Path) -> None:
    """Stopped after global step 5 (epoch 1, batch 2 of 3), the resumed ranks train the epoch's last batch of the
    same shard and crops, and the run ends with the uninterrupted run's weights."""
    epochs, straight, resumed = 3, tmp_path / "straight", tmp_path / "resumed"
    for probe in (straight, resumed):
        probe.mkdir()
    run_ranks(ddp_args(images, straight, epochs, straight), tmp_path / "logs1")
    stop = ["--trainer.callbacks.sigterm_step=4",
            "--trainer.callbacks.sigterm_at={0: before_optimizer_step, 1: before_optimizer_step}"]
    with running(ddp_args(images, resumed, epochs, resumed, *stop), tmp_path / "logs2") as ranks:
        assert exit_codes(ranks, tmp_path / "logs2", timeout=120) == [143, 143], logs(tmp_path / "logs2")
    interrupted = resumed / CHECKPOINTS / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == 5  # mid-epoch
    run_ranks(ddp_args(images, resumed, epochs, resumed, "--ckpt_path", str(interrupted)), tmp_path / "logs3")

    for rank in (0, 1):  # what each rank trained on, after augmentation, step by step
        seen = [json.loads((folder / f"batches{rank}.json").read_text()) for folder in (straight, resumed)]
        assert seen[0] == seen[1], f"rank {rank}"
    a, b = (torch.load(versions(run)[-1] / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
            for run in (straight, resumed))
    assert a["global_step"] == b["global_step"] == epochs * STEPS_PER_EPOCH
    assert [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])] == []
    assert_continuous(resumed, epochs, STEPS_PER_EPOCH)


# ----------------------------------------------------------------- the RNG states of ranks, directly


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws() -> list[Any]:
    return [torch.rand(2).tolist(), float(np.random.rand()), random.random()]


def _ranks_rng(rank: int, port: int, saved: Any, out: Any) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _seed(rank)
        states = capture_rng_of_ranks()
        note = restore_rng_of_rank(saved if saved is not None else states)
        out.put((rank, len(states), note, *_draws()))
    finally:
        torch.distributed.destroy_process_group()


def _in_two_ranks(saved: Any) -> list[tuple[Any, ...]]:
    from ddp_fault_worker import free_port

    context = multiprocessing.get_context("fork")
    out, port = context.Queue(), free_port()
    ranks = [context.Process(target=_ranks_rng, args=(r, port, saved, out)) for r in (0, 1)]
    for p in ranks:
        p.start()
    results = sorted(out.get(timeout=60) for _ in ranks)
    for p in ranks:
        p.join(timeout=30)
    return results


@pytest.fixture
def _rng_kept() -> Iterator[None]:
    """This process's RNG states as they were before the test."""
    state = capture_rng()
    yield
    restore_rng(state)


@pytest.mark.usefixtures("_rng_kept")
def test_each_rank_restores_its_own_state_and_extra_ranks_are_reseeded_per_rank() -> None:
    expected = []
    for rank in (0, 1):
        _seed(rank)
        expected.append(_draws())
    own = _in_two_ranks(None)  # gathered, then each rank restores entry [rank]: its own draws continue
    assert [r[1] for r in own] == [2, 2] and [r[2] for r in own] == [None, None]
    assert [list(r[3:]) for r in own] == expected

    torch.manual_seed(7)
    single = capture_rng()  # a checkpoint of one process (or an older one): rank 0's
    first, second = _in_two_ranks(single), _in_two_ranks(single)
    assert first == second  # rank 1 reseeded deterministically ...
    assert first[0][3:] != first[1][3:]  # ... and not to rank 0's stream
    torch.manual_seed(7)
    assert first[0][3] == torch.rand(2).tolist()  # rank 0 restored it
    assert first[0][2] == first[1][2] == ("the checkpoint holds the RNG states of 1 rank(s), this run has 2: "
                                          "rank 0 restored, rank 1 reseeded from rank 0's state and the rank")

    _seed(3)
    two = [capture_rng(), single]  # resumed by one process: rank 0's own, rank 1's unused
    assert restore_rng_of_rank(two) == ("the checkpoint holds the RNG states of 2 rank(s), this run has 1: "
                                        "rank 0 restored, the states of rank 1 left unused")
    drawn = _draws()
    _seed(3)
    assert drawn == _draws()
