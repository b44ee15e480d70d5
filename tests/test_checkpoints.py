"""What a checkpoint restores besides the weights (``transfer_lit.checkpoints.state``): each copy of the class
names is tested on its own, and the preprocessing that is logged is the one restored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone
from lightning.pytorch import Trainer

from transfer_lit import ImageDataModule, TransferModule
from transfer_lit.checkpoints import restore_transfer_state, save_transfer_state

NAMES = ["blue", "green", "red"]


def _trainer(root: Path) -> Trainer:
    return Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root, enable_checkpointing=False)


@pytest.fixture
def checkpoint(image_folder: Path, tmp_path: Path) -> Path:
    data = ImageDataModule(root=str(image_folder), batch_size=8, num_workers=0)
    assert data.class_names == NAMES
    model = TransferModule(TinyBackbone(), num_classes=3, class_names=data.class_names, mode="progressive",
                           preprocessing={"crop_size": 28})
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=data)
    model.lr_scale = 0.5
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_the_checkpoint_state_is_what_a_reload_restores(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = saved["transfer_lit"]
    assert state["class_names"] == NAMES and state["lr_scale"] == 0.5
    assert state["frozen_blocks"] == ["block1", "block2", "stem"] and state["preprocessing"]["crop_size"] == 28
    fresh = TransferModule(TinyBackbone(image_size=48), num_classes=3, mode="finetune")  # other names, blocks, size
    assert fresh.class_names == ["0", "1", "2"] and fresh.frozen_blocks == set()
    restore_transfer_state(fresh, saved)
    assert fresh.class_names == NAMES  # the checkpoint's own copy, not the hyperparameters'
    assert fresh.lr_scale == 0.5 and fresh.frozen_blocks == {"stem", "block1", "block2"}
    assert fresh.preprocessing.to_dict() == state["preprocessing"]
    again: dict = {}
    save_transfer_state(fresh, again)
    assert again["transfer_lit"] == state


def test_the_hyperparameters_copy_of_the_class_names_rebuilds_the_model(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["class_names"] == NAMES
    del saved["transfer_lit"]  # only the hyperparameters' copy left
    path = checkpoint.with_name("hparams_only.ckpt")
    torch.save(saved, path)
    assert TransferModule.load_from_checkpoint(path, backbone=TinyBackbone()).class_names == NAMES


def test_the_logged_preprocessing_is_the_restored_one(checkpoint: Path, image_folder: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    model = TransferModule(TinyBackbone(image_size=24), num_classes=3, class_names=NAMES)  # declares crop 24
    data = ImageDataModule(root=str(image_folder), batch_size=8, num_workers=0)
    _trainer(tmp_path / "v").validate(model, datamodule=data, ckpt_path=str(checkpoint), verbose=False)
    assert model.preprocessing.crop_size == 28
    logged = [r.getMessage() for r in caplog.records if "transfer_lit preprocessing" in r.getMessage()]
    assert len(logged) == 1 and "'crop_size': 28" in logged[0], logged


def test_load_from_checkpoint_takes_the_checkpoints_own_class_names(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["class_names"] = None  # only transfer_lit's copy holds the names now
    path = checkpoint.with_name("names_in_state_only.ckpt")
    torch.save(saved, path)
    assert TransferModule.load_from_checkpoint(path, backbone=TinyBackbone()).class_names == NAMES


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs "
                                                  "0; PytorchStreamWriter failed writing file data/0: file write "
                                                  "failed")])
def test_a_full_disk_names_the_file_keeps_the_last_good_one_and_leaves_no_partial_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    from transfer_lit.checkpoints import AtomicCheckpointIO
    from transfer_lit.errors import StorageError, user_error_message

    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def full(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageError) as raised:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    message = user_error_message(raised.value)
    assert message is not None and "last.ckpt" in message and "GiB free" in message
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}  # the last good checkpoint
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial temp file


def test_an_unwritable_predictions_file_is_one_clear_error_before_predicting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transfer_lit import CSVPredictionWriter
    from transfer_lit.errors import StorageError

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    writer = CSVPredictionWriter(str(tmp_path / "out" / "predictions.csv"))
    with pytest.raises(StorageError, match=r"cannot write '.*predictions\.csv': Permission denied; .*GiB free"):
        writer.on_predict_start(Trainer(logger=False, enable_checkpointing=False), None)  # type: ignore[arg-type]
