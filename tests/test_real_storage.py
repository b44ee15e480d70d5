"""A really full disk and a really read-only file system (a small tmpfs, mounted for the test; root only), where
tests/test_checkpoints.py simulates the errors: one message naming the path and the free space, no traceback,
the last good checkpoint intact and no partial file left (issue 13 item 11)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_image_folder
from test_errors import cli_error, fit_args


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs at ``tmp_path / "fs"``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Write zeros until the file system is full."""
    with (folder / "filler").open("wb") as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        except OSError:
            pass


def test_a_really_full_disk_keeps_the_last_checkpoint(small_fs: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from transfer_lit.cli import main

    images = make_image_folder(tmp_path / "images", {"train": 4, "val": 2}, size=16)
    run = small_fs / "run"
    main(fit_args(images, run))
    checkpoints = run / "lightning_logs" / "version_0" / "checkpoints"
    last = (checkpoints / "last.ckpt").read_bytes()
    _fill(small_fs)
    message = cli_error(fit_args(images, run, "--trainer.max_epochs", "2", "--ckpt_path", "last"), capsys)
    assert message.startswith(f"cannot write '{checkpoints}") and "No space left on device" in message
    assert "MiB free on" in message
    assert (checkpoints / "last.ckpt").read_bytes() == last  # the last good checkpoint, untouched
    assert not [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]  # no partial write left


def test_a_read_only_run_folder_or_predictions_file_is_one_message(small_fs: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from transfer_lit.cli import main

    images = make_image_folder(tmp_path / "images", {"train": 4, "val": 2}, size=16)
    main(fit_args(images, tmp_path / "run"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    message = cli_error(fit_args(images, small_fs / "run"), capsys)
    assert message.startswith(f"cannot write '{small_fs / 'run'}") and "Read-only file system" in message
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    predict = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_root", str(images / "val" / "red"),
               "--data.num_workers", "0", "--prediction_writer.output", str(small_fs / "predictions.csv"),
               "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"]
    message = cli_error(predict, capsys)
    assert message.startswith(f"cannot write '{small_fs / 'predictions.csv'}': Read-only file system")
