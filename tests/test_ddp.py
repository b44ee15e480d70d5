"""Progressive unfreezing under two-process DDP on CPU (gloo), through a Lightning Trainer.

Lightning's ``ddp`` launcher re-runs the main script for each rank, so the run lives in a standalone
script (tests/ddp_worker.py) started in a subprocess. Lightning's own ``BackboneFinetuning`` fails
the same check: see benchmarks/backbone_finetuning_ddp.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import union_run
from lightning.pytorch.strategies import FSDPStrategy

from transfer_lit import ImageDataModule, ProgressiveUnfreezing, TransferModule
from transfer_lit.cli import TransferCLI

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "configs"


def _run_worker(out: Path, mode: str, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(TESTS / "ddp_worker.py"), str(out), mode, *extra], env=env,
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _run_worker(tmp_path_factory.mktemp("ddp"), "ddp")


def test_two_ranks_train_what_one_process_trains_on_the_union_of_their_batches(tmp_path: Path) -> None:
    """The independent reference for the thawed-gradient sync: ranks agreeing with each other is not enough (a
    sync that summed instead of averaged would keep them equal, and wrong)."""
    ranks = _run_worker(tmp_path, "union")
    reference = union_run(devices=1)  # step k: rank 0's batch k and rank 1's batch k together
    assert ranks[0]["frozen"] == ["stem"] == sorted(reference.frozen_blocks)
    expected = {n: t.detach() for n, t in reference.state_dict().items()}
    for rank in ranks:
        worst = max(float((rank["final"][n] - t).abs().max()) for n, t in expected.items())
        assert worst < 1e-6, worst


def test_text_ranks_are_identical_after_thaws_on_their_own_length_buckets(tmp_path: Path) -> None:
    """The image guarantee for text: a progressive run of a tiny BERT on length-bucketed batches, sharded by the
    sampler itself (Lightning does not wrap it), ends with every parameter equal on both ranks."""
    pytest.importorskip("transformers")
    from conftest import make_sentiment_rows, make_text_model, write_tsv

    model = make_text_model(tmp_path / "tiny-bert")
    train = write_tsv(tmp_path / "train.tsv", make_sentiment_rows(64))
    first, second = _run_worker(tmp_path, "text", str(model), str(train))
    assert first["world_size"] == 2 and first["frozen"] == second["frozen"] == []
    assert first["data"] != second["data"] and len(first["data"]) == len(second["data"])
    for name, tensor in first["final"].items():
        assert torch.equal(tensor, second["final"][name]), name


def test_ranks_saw_different_data(ranks: list[dict]) -> None:
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["data"] != ranks[1]["data"]


def test_every_parameter_is_identical_across_ranks_after_thawing(ranks: list[dict]) -> None:
    first, second = ranks
    assert first["parameters"] == second["parameters"]
    different = [n for n in first["parameters"] if not torch.equal(first["final"][n], second["final"][n])]
    assert different == []
    assert first["lr_scale"] == second["lr_scale"] != 1.0  # LRFinder: rank 0's suggestion everywhere


def test_thawed_blocks_trained_and_frozen_stem_did_not(ranks: list[dict]) -> None:
    rank = ranks[0]
    assert rank["frozen"] == ["stem"]

    def changed(prefix: str) -> list[bool]:
        names = [n for n in rank["parameters"] if n.startswith(prefix)]
        return [not torch.equal(rank["initial"][n], rank["final"][n]) for n in names]

    assert all(changed("backbone.block2.")) and all(changed("backbone.block1.")) and all(changed("head."))
    assert not any(changed("backbone.stem."))
    # bn_policy 'eval': the frozen stem's BatchNorm statistics stay the pretrained ones on every rank
    for key in ("backbone.stem.1.running_mean", "backbone.stem.1.running_var"):
        assert all(torch.equal(r["final"][key], rank["initial"][key]) for r in ranks)
    assert not any(n.startswith("backbone.stem.") for n in rank["optimizer_state"])


def _cli_args(config: str, root: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / config), "--data.root", str(root), "--model.backbone.init_args.weights=null",
            "--data.num_workers=0", *extra]


def test_ddp_recipe_parses_and_builds(image_folder: Path) -> None:
    cli = TransferCLI(TransferModule, ImageDataModule, run=False,
                      args=_cli_args("ddp.yaml", image_folder, "--trainer.accelerator=cpu", "--trainer.devices=2"))
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy" and cli.trainer.num_devices == 2
    assert any(isinstance(c, ProgressiveUnfreezing) for c in cli.trainer.callbacks)
    assert cli.model.mode == "progressive"


class _ParseOnly(TransferCLI):
    """FSDP needs GPUs to build a Trainer: instantiate everything the config names except the Trainer."""

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)


def test_fsdp_recipe_parses(image_folder: Path) -> None:
    cli = _ParseOnly(TransferModule, ImageDataModule, run=False,
                     args=_cli_args("fsdp.yaml", image_folder, "--model.backbone.init_args.name=vit_b_16"))
    trainer = cli.config_init.trainer
    assert isinstance(trainer.strategy, FSDPStrategy)
    assert trainer.strategy.kwargs["use_orig_params"] is True  # per-block parameter groups need the originals
    assert "EncoderBlock" in repr(trainer.strategy.kwargs["auto_wrap_policy"])
    assert any(isinstance(c, ProgressiveUnfreezing) for c in trainer.callbacks)


def test_metric_driven_phases_and_restore_best_keep_the_ranks_identical(tmp_path: Path) -> None:
    """Each rank logs its own score (rank 1's keeps improving): rank 0's decides for both, so both thaw at the same
    epochs, restore the same best weights (BatchNorm of frozen blocks training under train_bn) and end equal."""
    ranks = _run_worker(tmp_path, "metric")
    for rank in ranks:
        assert rank["starts"] == [2, 4] and rank["epochs"] == 6 and rank["frozen"] == ["stem"]
        shots = rank["snapshots"]
        for restored, best in (("start2", "val0"), ("start4", "val3")):
            assert all(torch.equal(shots[restored][k], v) for k, v in shots[best].items()), (restored, best)
    final = [rank["snapshots"]["val5"] for rank in ranks]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    stem_bn = "backbone.stem.1.weight"
    assert not torch.equal(ranks[0]["snapshots"]["start0"][stem_bn], final[0][stem_bn])  # train_bn: it trained
