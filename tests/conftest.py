"""Shared fixtures: offline mode, a tiny real backbone, tiny real image folders, the ../shared data."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from transfer_lit import Backbone, ImagePreprocessing

SHARED = Path(__file__).resolve().parents[2] / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_256"
needs_hymenoptera = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} absent (../shared not here)")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the network: a missing weight file must fail fast, not download."""
    monkeypatch.setenv("TRANSFER_LIT_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Single-threaded CPU kernels: runs compared bit for bit must use the same thread count (it changes
    the summation order), and tiny models run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyBackbone(Backbone):
    """Three conv-BN-ReLU blocks then global pooling: a real, fast network with BatchNorm."""

    def __init__(self, width: int = 8, image_size: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width),
                                    nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 2 * width
        self.preprocessing = ImagePreprocessing(image_size + 4, image_size, "bilinear", (0.5,) * 3, (0.25,) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.stem(x)))


class MLPBackbone(Backbone):
    """Three linear blocks on flat inputs, no BatchNorm: what a rank sees of a batch is all that matters to it,
    so two DDP ranks must train exactly what one process trains on their two batches together."""

    def __init__(self, width: int = 16, inputs: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(inputs, width), nn.Tanh())
        self.block1 = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.block2 = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.stem(x)))


@pytest.fixture
def tiny_backbone() -> TinyBackbone:
    torch.manual_seed(0)
    return TinyBackbone()


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 230)}


def make_image_folder(root: Path, per_class: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/*.png``: noisy images whose dominant colour is the class (learnable)."""
    rng = random.Random(seed)
    for split, count in per_class.items():
        for name, rgb in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = Image.new("RGB", (size, size), tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in rgb))
                for _ in range(20):
                    x, y = rng.randrange(size), rng.randrange(size)
                    image.putpixel((x, y), tuple(rng.randrange(256) for _ in range(3)))
                image.save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three colour classes: 12 train, 6 val and 6 test images each."""
    return make_image_folder(tmp_path / "images", {"train": 12, "val": 6, "test": 6})
