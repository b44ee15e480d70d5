"""Tiny backbones importable by ``class_path`` for tests that run the CLI in a subprocess.

Run the CLI with ``PYTHONPATH=tests`` and ``--model.backbone.class_path cli_tiny_backbone.TinyCLIBackbone``.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from transfer_lit import Backbone, ImagePreprocessing


class TinyCLIBackbone(Backbone):
    """Two conv blocks then global pooling, on 16 px crops; ``delay`` slows each forward to make runs killable.

    Args:
        width: channels of the first block.
        delay: seconds slept in every forward pass.
    """

    def __init__(self, width: int = 4, delay: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 2 * width
        self.delay = delay
        self.preprocessing = ImagePreprocessing(18, 16, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return self.block1(self.stem(x))


class OtherCLIBackbone(Backbone):
    """A different architecture (other block names and widths), to load a wrong checkpoint into."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 6
        self.preprocessing = ImagePreprocessing(18, 16, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class BuggyCLIBackbone(TinyCLIBackbone):
    """A user's backbone with a bug: its forward raises a ValueError of its own (not about the input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("too many values to unpack (expected 2)")


class SendSignal(Callback):
    """Send this process ``signum`` once, at the end of batch ``batch`` of ``stage`` in epoch ``epoch``.

    Args:
        signum: signal number (2 = SIGINT, 15 = SIGTERM).
        epoch: epoch (0-based) at which to send it.
        stage: ``train`` or ``validate``: which loop's batch end triggers it.
        batch: index of the batch after which it is sent.
        count: how many times to send it, back to back (2 = a second Ctrl-C before the first is handled).
    """

    def __init__(self, signum: int = 15, epoch: int = 1, stage: str = "train", batch: int = 0, count: int = 1) -> None:
        self.signum, self.epoch, self.stage, self.batch, self.count = signum, epoch, stage, batch, count
        self.sent = False

    def _maybe_send(self, trainer: Trainer, stage: str, batch_idx: int) -> None:
        if not self.sent and not trainer.sanity_checking and (stage, trainer.current_epoch, batch_idx) == (
            self.stage, self.epoch, self.batch
        ):
            self.sent = True
            for _ in range(self.count):
                # raise_signal runs the Python handler before it returns. os.kill may deliver to another thread
                # (torch's, tqdm's), and two signals pending at once reach the handler as one.
                signal.raise_signal(self.signum)

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_send(trainer, "train", batch_idx)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._maybe_send(trainer, "validate", batch_idx)
