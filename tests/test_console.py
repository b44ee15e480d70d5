"""What transfer-lit prints: the progress bar it picks (Rich in a terminal when rich is installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import make_image_folder
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from transfer_lit.cli import build_cli
from transfer_lit.console import progress_bar

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"


class Terminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_rich_bar_only_in_a_terminal_with_rich_and_no_bar_of_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    assert progress_bar({}) is None  # pytest captures stdout: not a terminal
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert isinstance(progress_bar({}), RichProgressBar)
    assert progress_bar({"enable_progress_bar": False}) is None
    assert progress_bar({"callbacks": [TQDMProgressBar()]}) is None
    monkeypatch.setitem(sys.modules, "rich", None)  # not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert progress_bar({}) is None


def test_the_cli_trains_with_the_rich_bar_in_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    images = make_image_folder(tmp_path / "images", {"train": 3, "val": 2}, size=16)
    monkeypatch.setattr(sys, "stdout", Terminal())
    args = ["--config", str(DEBUG), "--data.root", str(images), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "true"]
    cli = build_cli(args, run=False)
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    quiet = build_cli([*args[:-1], "false"], run=False)  # the user switched the bar off: no error, no bar
    assert quiet.trainer.progress_bar_callback is None
