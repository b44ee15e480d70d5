"""Feature caching for linear probes: keys, hits and misses, equivalence with image training, checkpoints."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyBackbone, make_image_folder
from lightning.pytorch import Trainer, seed_everything
from PIL import Image
from torch.utils.data import DataLoader

from transfer_lit import ImageDataModule, TransferModule, build_eval_transform
from transfer_lit.data.decode import ImageDataset
from transfer_lit.data.feature_cache import (
    FeatureCache,
    cache_key,
    dataset_fingerprint,
    resolve_cache_features,
    weights_fingerprint,
)
from transfer_lit.protocols import CachedFeatures


def _trainer(root: Path, epochs: int = 2, **kwargs) -> Trainer:
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root, **kwargs)


def _module(mode: str = "linear_probe", seed: int = 0) -> TransferModule:
    torch.manual_seed(seed)
    return TransferModule(TinyBackbone(), num_classes=3, mode=mode, lr=0.05)


def _data(root: Path, **kwargs) -> ImageDataModule:
    return ImageDataModule(root=str(root), batch_size=8, num_workers=0, **kwargs)


def _key(backbone: TinyBackbone, data: ImageDataModule, split: str = "train") -> str:
    return cache_key(_probe(backbone), backbone.preprocessing, data.splits[split], "32-true")


def _probe(backbone: TinyBackbone, cls: type[TransferModule] = TransferModule) -> TransferModule:
    return cls(backbone, num_classes=3, mode="linear_probe")


def test_key_depends_on_every_component(image_folder: Path) -> None:
    torch.manual_seed(0)
    backbone, data = TinyBackbone(), _data(image_folder)
    key = _key(backbone, data)
    assert key == _key(backbone, data)
    assert key != _key(backbone, data, "val")
    relabelled = [(p, (label + 1) % 3) for p, label in data.splits["train"]]
    assert dataset_fingerprint(relabelled) == dataset_fingerprint(data.splits["train"])  # labels are read, not cached
    p = backbone.preprocessing
    for change in ({"crop_size": 28}, {"resize_size": 40}, {"interpolation": "bicubic"}, {"mean": (0.4, 0.5, 0.5)}):
        changed = type(p).from_dict({**p.to_dict(), **change})
        assert cache_key(_probe(backbone), changed, data.splits["train"], "32-true") != key, change
    assert cache_key(_probe(backbone), p, data.splits["train"], "bf16-mixed") != key
    assert cache_key(_probe(backbone, _DoubledFeatures), p, data.splits["train"], "32-true") != key
    with torch.no_grad():
        backbone.block1[0].weight[0, 0, 0, 0] += 1e-3
    assert _key(backbone, data) != key
    before = weights_fingerprint(backbone)
    backbone.block1[1].running_mean += 1.0  # BatchNorm statistics change the features too
    assert weights_fingerprint(backbone) != before


def test_key_depends_on_the_files(image_folder: Path) -> None:
    backbone = TinyBackbone()
    key = _key(backbone, _data(image_folder))
    first = Path(_data(image_folder).splits["train"][0][0])
    Image.new("RGB", (40, 40), (1, 2, 3)).save(first)  # modified content (size and mtime)
    os.utime(first, ns=(0, 12345))
    modified = _key(backbone, _data(image_folder))
    assert modified != key
    os.utime(first, ns=(0, 67890))  # same bytes, new modification time
    assert _key(backbone, _data(image_folder)) != modified
    Image.new("RGB", (40, 40), (9, 9, 9)).save(first.parent / "extra.png")  # added file
    assert _key(backbone, _data(image_folder)) not in (key, modified)


def test_policy() -> None:
    probe, finetune = _module(), _module("finetune")
    assert resolve_cache_features("auto", probe, "val", "none")
    assert not resolve_cache_features("auto", probe, "train", "none")  # random crops are not cacheable
    assert resolve_cache_features(True, probe, "train", "none")
    assert not resolve_cache_features(True, probe, "test", "none")
    assert not resolve_cache_features(False, probe, "val", "none")
    assert not resolve_cache_features("auto", finetune, "val", "none")
    with pytest.raises(ValueError, match=r"cache_features=true cannot be honoured: model\.mode='finetune' trains"):
        resolve_cache_features(True, finetune, "train", "none")
    with pytest.raises(ValueError, match=r"data\.augment must be 'none'"):
        resolve_cache_features(True, probe, "train", "trivialaugment")
    with pytest.raises(ValueError, match=r"data\.cache_features must be"):
        ImageDataModule(root=".", cache_features="yes")  # type: ignore[arg-type]


class _ZeroLogits(TransferModule):
    """A research subclass whose forward the cache would bypass (the measured case: val_loss 0.7012 with the
    cache, 0.6931 = ln 2 without, on two classes)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(inputs), self.num_classes)


class _ZeroLogitsBatch(TransferModule):
    def batch_logits(self, batch: Any) -> torch.Tensor:
        return torch.zeros(len(batch[1]), self.num_classes)


class _DoubledFeatures(TransferModule):
    """Overrides ``features``: the cache computes through it, so it is honoured."""

    def features(self, inputs: Any) -> torch.Tensor:
        return 2 * super().features(inputs)


@pytest.mark.parametrize("cls", [_ZeroLogits, _ZeroLogitsBatch])
def test_a_subclass_whose_override_the_cache_would_bypass_is_never_served_cached_features(
        cls: type[TransferModule], image_folder: Path, tmp_path: Path) -> None:
    model = _probe(TinyBackbone(), cls)
    assert cls.__name__ in str(model.feature_cache_refusal())
    with pytest.raises(ValueError, match=rf"cache_features=true cannot be honoured: {cls.__name__} overrides"):
        resolve_cache_features(True, model, "train", "none")
    data = _data(image_folder)  # cache_features='auto': off for this module, with a warning
    with pytest.warns(UserWarning, match=rf"feature cache: off \({cls.__name__} overrides"):
        result = _trainer(tmp_path, epochs=1).validate(model, data, verbose=False)
    assert data.feature_cache.misses == 0
    assert result[0]["val_loss"] == pytest.approx(math.log(3), abs=1e-6)  # the override's zero logits, not the head's


def test_an_overridden_features_is_honoured_by_the_cache(image_folder: Path, tmp_path: Path) -> None:
    losses = []
    for cache in ("auto", False):
        torch.manual_seed(0)
        data = _data(image_folder, cache_features=cache)
        model = _probe(TinyBackbone(), _DoubledFeatures)
        losses.append(_trainer(tmp_path / str(cache), epochs=1).validate(model, data, verbose=False)[0]["val_loss"])
        assert data.feature_cache.misses == (1 if cache else 0)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_fit_hits_and_misses(image_folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    data = _data(image_folder, cache_features=True, feature_cache_dir=str(cache_dir))
    trainer = _trainer(tmp_path / "a", reload_dataloaders_every_n_epochs=1)
    trainer.fit(_module(), data)
    assert data.feature_cache.misses == 2  # train and val, once each
    assert data.feature_cache.hits >= 1  # reloaded every epoch, served from memory
    assert len(list(cache_dir.glob("features-*.pt"))) == 2
    assert isinstance(next(iter(trainer.train_dataloader)), CachedFeatures)

    fresh = _data(image_folder, cache_features=True, feature_cache_dir=str(cache_dir))  # a later run: from disk
    _trainer(tmp_path / "b").fit(_module(), fresh)
    assert (fresh.feature_cache.hits, fresh.feature_cache.misses) == (2, 0)

    other = _module(seed=1)  # other backbone weights: both splits are extracted again
    again = _data(image_folder, cache_features=True, feature_cache_dir=str(cache_dir))
    _trainer(tmp_path / "c").fit(other, again)
    assert again.feature_cache.misses == 2

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image_folder / "val" / "red" / "new.png")
    grown = _data(image_folder, cache_features=True, feature_cache_dir=str(cache_dir))
    _trainer(tmp_path / "d").fit(_module(), grown)
    assert (grown.feature_cache.hits, grown.feature_cache.misses) == (1, 1)  # train hit, val miss


def test_auto_caches_validation_only(image_folder: Path, tmp_path: Path) -> None:
    data = _data(image_folder)  # cache_features="auto"
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(_module(), data)
    assert data.feature_cache.misses == 1
    assert not isinstance(next(iter(trainer.train_dataloader)), CachedFeatures)
    assert isinstance(next(iter(trainer.val_dataloaders)), CachedFeatures)
    finetune_data = _data(image_folder)
    _trainer(tmp_path / "ft", epochs=1).fit(_module("finetune"), finetune_data)
    assert finetune_data.feature_cache.misses == 0


class EvalTransformTraining(ImageDataModule):
    """Uncached reference: the training images go through the eval transform, like the cache does."""

    def train_dataloader(self) -> DataLoader:
        dataset = ImageDataset(self.splits["train"], build_eval_transform(self.resolved_preprocessing()))
        return self._dataloader(dataset, shuffle=True, drop_last=len(dataset) > self.batch_size)


def test_cached_training_equals_image_training(image_folder: Path, tmp_path: Path) -> None:
    heads, metrics = [], []
    for data in (EvalTransformTraining(root=str(image_folder), batch_size=8, num_workers=0, cache_features=False),
                 _data(image_folder, cache_features=True)):
        seed_everything(0)
        module = _module()
        trainer = _trainer(tmp_path, epochs=3)
        trainer.fit(module, data)
        heads.append({k: v.clone() for k, v in module.head.state_dict().items()})
        metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
    for name in heads[0]:
        torch.testing.assert_close(heads[1][name], heads[0][name], rtol=1e-4, atol=1e-5)
    assert metrics[1]["val_acc"] == pytest.approx(metrics[0]["val_acc"])
    assert metrics[1]["val_loss"] == pytest.approx(metrics[0]["val_loss"], rel=1e-4)


def test_checkpoint_from_cached_training_predicts_on_images(image_folder: Path, tmp_path: Path) -> None:
    data = _data(image_folder, cache_features=True, predict_root=str(image_folder / "test"))
    module = _module()
    trainer = _trainer(tmp_path, epochs=3)
    trainer.fit(module, data)
    path = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("backbone.") for k in state) and any(k.startswith("head.") for k in state)

    restored = TransferModule.load_from_checkpoint(path, backbone=TinyBackbone())
    predict_data = _data(image_folder, predict_root=str(image_folder / "test"))
    batches = _trainer(tmp_path).predict(restored, predict_data)
    probs = torch.cat([b["probs"] for b in batches])
    assert probs.shape == (18, 3)
    labels = torch.tensor([["blue", "green", "red"].index(Path(p).parent.name) for b in batches for p in b["paths"]])
    assert (probs.argmax(1) == labels).float().mean() > 0.5  # colours are easy: the probe learned them
    x = torch.stack([ImageDataset(data.splits["test"], build_eval_transform(module.preprocessing))[0][0]])
    torch.testing.assert_close(restored.eval()(x), module.eval()(x))


def test_unreadable_images_are_left_out(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    (root / "train" / "red" / "broken.png").write_bytes(b"not an image")
    data = _data(root, cache_features=True, bad_images="skip")
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(_module(), data)
    assert len(trainer.train_dataloader.dataset) == 12  # 13 files, one unreadable


def test_cache_entries_load_from_disk(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    assert cache.lookup("k" * 64) is None
    from transfer_lit.data.feature_cache import FeatureEntry

    cache.store("k" * 64, FeatureEntry(["a", "b"], torch.arange(6.0).view(2, 3)))
    loaded = FeatureCache(tmp_path).lookup("k" * 64)
    assert loaded is not None and loaded.paths == ["a", "b"]
    torch.testing.assert_close(loaded.features, torch.arange(6.0).view(2, 3))


# ----------------------------------------------------------------------------- two-process DDP (gloo, CPU)


def _ddp_run(images: Path, out: Path, cache_dir: Path) -> None:
    """Run by Lightning's ddp launcher on both ranks (this file is its own worker, see the test below)."""
    torch.set_num_threads(1)
    seed_everything(0)
    module = _module()
    data = _data(images, cache_features=True, feature_cache_dir=str(cache_dir))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    torch.save({"hits": data.feature_cache.hits, "misses": data.feature_cache.misses,
                "entries": {k: (e.paths, e.features) for k, e in data.feature_cache.memory.items()},
                "seen": len(trainer.train_dataloader.sampler),
                "head": {k: v.clone() for k, v in module.head.state_dict().items()}},
               out / f"{cache_dir.name}-rank{trainer.global_rank}.pt")


def test_ddp_ranks_share_one_extraction(image_folder: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cache = tmp_path / "cache"
    for _ in range(2):  # the second run finds the first one's files
        done = subprocess.run([sys.executable, __file__, str(image_folder), str(tmp_path), str(cache)], env=env,
                              cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        ranks = [torch.load(tmp_path / f"cache-rank{r}.pt", weights_only=False) for r in (0, 1)]
        if _ == 0:
            assert [(r["hits"], r["misses"]) for r in ranks] == [(0, 2), (0, 2)]
            first = ranks
        else:
            assert [(r["hits"], r["misses"]) for r in ranks] == [(2, 0), (2, 0)]
    assert [r["seen"] for r in first] == [18, 18]  # 36 training images, half per rank
    for key, (paths, features) in first[0]["entries"].items():
        assert first[1]["entries"][key][0] == paths
        torch.testing.assert_close(first[1]["entries"][key][1], features)
    for name, value in first[0]["head"].items():
        torch.testing.assert_close(first[1]["head"][name], value)  # DDP kept the heads in sync

    # the gathered features are the ones a single process extracts
    single = _data(image_folder, cache_features=True)
    seed_everything(0)
    _trainer(tmp_path / "single", epochs=1).fit(_module(), single)
    for key, entry in single.feature_cache.memory.items():
        paths, features = first[0]["entries"][key]
        assert paths == entry.paths
        torch.testing.assert_close(features, entry.features, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    _ddp_run(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
