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


#: Words of the tiny tokenizer's vocabulary (and of the synthetic sentiment texts).
POSITIVE = ["good", "great", "fine", "love", "happy", "nice"]
NEGATIVE = ["bad", "awful", "poor", "hate", "sad", "ugly"]
NEUTRAL = ["the", "film", "was", "a", "movie", "plot", "and", "it", "very", "really", "story", "acting"]


def make_text_model(folder: Path, sentence_transformers: bool = False, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random BERT (hidden 16, ``layers`` layers) with a WordPiece tokenizer of a few dozen words to
    ``folder``, as ``save_pretrained`` does (a sentence-transformers mean-pooling config when asked)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *POSITIVE, *NEGATIVE, *NEUTRAL]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    try:  # transformers 5 takes the vocabulary itself, 4.x its file
        tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    except TypeError:
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(str(folder))
    if sentence_transformers:
        (folder / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": '
                                             '"sentence_transformers.models.Transformer"}, {"idx": 1, "name": "1", '
                                             '"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
        (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 32}')
    return folder


def make_sentiment_rows(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(text, "pos" | "neg")``: a few neutral words around one sentiment word (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 == 0 else "neg"
        words = [*rng.sample(NEUTRAL, rng.randint(1, 6)), rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] | None = ("text", "label")) -> Path:
    """``rows`` as a tab-separated file (with ``header`` unless None)."""
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentence-transformers-style BERT folder (mean pooling, max_seq_length 32)."""
    pytest.importorskip("transformers")
    return make_text_model(tmp_path_factory.mktemp("text_model") / "tiny-bert", sentence_transformers=True)


@pytest.fixture
def sentiment_files(tmp_path: Path) -> dict[str, Path]:
    """Train (48), val (16) and test (16) TSV files of synthetic sentiment texts with a header."""
    rows = make_sentiment_rows(80)
    return {"train": write_tsv(tmp_path / "train.tsv", rows[:48]), "val": write_tsv(tmp_path / "val.tsv", rows[48:64]),
            "test": write_tsv(tmp_path / "test.tsv", rows[64:])}
