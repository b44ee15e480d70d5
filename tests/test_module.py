"""TransferModule: linear probe vs fine-tune, tasks, loss options, checkpoint round trip, predict."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyBackbone, make_image_folder
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from transfer_lit import Backbone, ImageDataModule, ImagePreprocessing, MLPHead, TransferModule


def _trainer(epochs: int = 1, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _data(root: Path, batch_size: int = 8) -> ImageDataModule:
    return ImageDataModule(root=str(root), batch_size=batch_size, num_workers=0)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _model(**kwargs) -> TransferModule:
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", 3)
    return TransferModule(TinyBackbone(), **kwargs)


# ------------------------------------------------------------------ linear probe / finetune


class _BackboneModeProbe(Callback):
    """Records the backbone's and head's train/eval mode at every training batch."""

    def __init__(self) -> None:
        self.modes: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        backbone_training = any(m.training for m in pl_module.backbone.modules())
        self.modes.append((backbone_training, pl_module.head.training))


def test_linear_probe_freezes_backbone_and_builds_no_graph_through_it() -> None:
    model = _model(mode="linear_probe")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    assert model.head.training
    x = torch.randn(4, 3, 32, 32)
    features = model.features(x)
    assert features.shape == (4, model.backbone.num_features)
    assert features.grad_fn is None and not features.requires_grad
    logits = model(x)
    assert logits.grad_fn is not None and logits.shape == (4, 3)


def test_progressive_phase_builds_no_graph_before_the_first_trainable_block() -> None:
    """Frozen input-side blocks keep no activations for backward, and backward stops where training starts."""
    model = _model(mode="progressive")
    model.set_frozen_blocks(["stem", "block1"])
    outputs: dict[str, torch.Tensor] = {}
    for name in ("stem", "block1", "block2"):
        getattr(model.backbone, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert outputs["stem"].grad_fn is None and outputs["block1"].grad_fn is None
    assert outputs["block2"].grad_fn is not None
    assert all(p.grad is None for p in model.backbone.stem.parameters())
    assert all(p.grad is not None for p in model.backbone.block2.parameters())


def test_linear_probe_fit_changes_only_the_head(image_folder: Path) -> None:
    model = _model(mode="linear_probe", lr=1e-2)
    backbone_before, head_before = _snapshot(model.backbone), _snapshot(model.head)
    probe = _BackboneModeProbe()
    _trainer(callbacks=[probe]).fit(model, datamodule=_data(image_folder))
    assert probe.modes and all(mode == (False, True) for mode in probe.modes)
    after = model.backbone.state_dict()
    for key, value in backbone_before.items():  # parameters and BN running statistics
        assert torch.equal(value, after[key]), key
    for key, value in head_before.items():
        assert not torch.equal(value, model.head.state_dict()[key]), key


def test_finetune_trains_every_block(image_folder: Path) -> None:
    model = _model(mode="finetune", lr=1e-2, backbone_lr_mult=0.1)
    assert all(p.requires_grad for p in model.parameters())
    before = _snapshot(model)
    probe = _BackboneModeProbe()
    _trainer(callbacks=[probe]).fit(model, datamodule=_data(image_folder))
    assert probe.modes and all(mode == (True, True) for mode in probe.modes)
    after = model.state_dict()
    for block in ("stem", "block1", "block2"):
        weights = [k for k in before if k.startswith(f"backbone.{block}.")]
        assert weights and all(not torch.equal(before[k], after[k]) for k in weights if "num_batches" not in k), block
    assert not torch.equal(before["head.0.weight"], after["head.0.weight"])


def test_head_width_is_read_from_the_backbone() -> None:
    model = _model(head=lambda n, k: MLPHead(n, k, hidden=5))
    assert model.head[0].in_features == TinyBackbone().num_features == 16
    assert model.head[-1].out_features == 3
    assert TransferModule(TinyBackbone(width=4), num_classes=3).head[0].in_features == 8


# ------------------------------------------------------------------ tasks


def test_multiclass_logits_loss_and_probabilities() -> None:
    model = _model()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 1, 0])
    logits = model(x)
    assert logits.shape == (5, 3)
    assert torch.allclose(model.loss(logits, y), F.cross_entropy(logits, y))
    probs = model.probabilities(logits)
    assert torch.allclose(probs.sum(-1), torch.ones(5))


def test_binary_task_on_two_class_folders(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "two", {"train": 8, "val": 4})
    for split in ("train", "val"):
        shutil.rmtree(root / split / "blue")
    data = _data(root)
    assert data.class_names == ["green", "red"]
    model = _model(num_classes=2, task="binary", class_names=data.class_names, lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    logits = model(x)
    assert logits.shape == (4, 1)
    assert torch.allclose(model.loss(logits, y), F.binary_cross_entropy_with_logits(logits.squeeze(1), y.float()))
    assert model.probabilities(logits).shape == (4,)
    trainer = _trainer()
    trainer.fit(model, datamodule=data)
    for key in ("train_loss_epoch", "val_loss", "val_acc", "val_f1", "val_auroc"):
        assert key in trainer.callback_metrics, sorted(trainer.callback_metrics)


def test_binary_needs_two_classes() -> None:
    with pytest.raises(ValueError, match=r"model\.num_classes must be 2 for task 'binary', got 3"):
        _model(num_classes=3, task="binary")


def test_multilabel_task_on_a_synthetic_dataset() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = (torch.rand(16, 4, generator=gen) > 0.5).long()
    model = _model(num_classes=4, task="multilabel", lr=1e-2, preprocessing={"crop_size": 32})
    logits = model(x[:5])
    assert logits.shape == (5, 4)
    assert torch.allclose(model.loss(logits, y[:5]), F.binary_cross_entropy_with_logits(logits, y[:5].float()))
    probs = model.probabilities(logits)
    assert probs.shape == (5, 4) and ((probs > 0) & (probs < 1)).all()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    head_before = _snapshot(model.head)
    trainer = _trainer()
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    assert "val_f1" in trainer.callback_metrics and "val_auroc" in trainer.callback_metrics
    assert not torch.equal(head_before["0.weight"], model.head[0].weight)


# ------------------------------------------------------------------ loss options


CONFIDENT = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
TARGET = torch.tensor([0, 1, 2, 1])  # the last sample is confidently wrong (true class 1)


def test_label_smoothing_matches_reference_and_raises_loss_of_confident_predictions() -> None:
    plain = _model().loss(CONFIDENT, TARGET)
    smoothed = _model(label_smoothing=0.2).loss(CONFIDENT, TARGET)
    assert torch.allclose(smoothed, F.cross_entropy(CONFIDENT, TARGET, label_smoothing=0.2))
    right = CONFIDENT[:3], TARGET[:3]  # all correct: smoothing penalises their confidence
    assert _model(label_smoothing=0.2).loss(*right) > _model().loss(*right)
    assert not torch.allclose(plain, smoothed)


def test_class_weights_match_reference_and_weight_the_right_class() -> None:
    weights = [1.0, 4.0, 1.0]
    plain = _model().loss(CONFIDENT, TARGET)
    weighted = _model(class_weights=weights).loss(CONFIDENT, TARGET)
    assert torch.allclose(weighted, F.cross_entropy(CONFIDENT, TARGET, weight=torch.tensor(weights)))
    assert weighted > plain  # class 1 holds the wrong prediction, and it now counts 4 times
    assert _model(class_weights=[4.0, 1.0, 4.0]).loss(CONFIDENT, TARGET) < plain


def test_binary_smoothing_and_class_weights() -> None:
    logits, y = torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0])
    model = _model(num_classes=2, task="binary", label_smoothing=0.2, class_weights=[1.0, 3.0])
    smoothed = torch.tensor([0.9, 0.1, 0.1])
    per_sample = F.binary_cross_entropy_with_logits(logits.squeeze(1), smoothed, reduction="none")
    expected = (per_sample * torch.tensor([3.0, 1.0, 1.0])).mean()
    assert torch.allclose(model.loss(logits, y), expected)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"class_names": ["a", "b"]}, r"model\.class_names has 2 names but model\.num_classes=3"),
        ({"class_weights": [1.0, 2.0, 3.0, 4.0]}, r"model\.class_weights has 4 values, expected num_classes=3"),
        ({"label_smoothing": 1.0}, r"model\.label_smoothing must be in \[0, 1\), got 1\.0"),
        ({"mode": "frozen"}, r"model\.mode must be one of \['linear_probe', 'finetune', 'progressive'\], got 'frozen'"),
        ({"num_classes": 1}, r"model\.num_classes must be >= 2"),
    ],
)
def test_bad_arguments_name_key_and_value(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _model(**kwargs)


# ------------------------------------------------------------------ checkpoint and predict


def test_checkpoint_restores_preprocessing_and_class_names_and_predict_uses_them(
    image_folder: Path, tmp_path: Path
) -> None:
    data = _data(image_folder)
    model = _model(class_names=data.class_names, preprocessing={"crop_size": 28}, lr=1e-2)
    expected = ImagePreprocessing(36, 28, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert model.preprocessing == expected
    trainer = _trainer()
    trainer.fit(model, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert raw["transfer_lit"]["preprocessing"] == expected.to_dict()
    assert raw["transfer_lit"]["class_names"] == ["blue", "green", "red"]

    # A backbone declaring other preprocessing must not make predict drift from what the model was trained with.
    restored = TransferModule.load_from_checkpoint(path, backbone=TinyBackbone(image_size=48))
    assert restored.preprocessing == expected
    assert restored.class_names == ["blue", "green", "red"]
    model.eval()
    restored.eval()
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(model(x), restored(x))

    predict_data = ImageDataModule(predict_root=str(image_folder / "test"), batch_size=8, num_workers=0)
    batches = _trainer().predict(restored, datamodule=predict_data)
    assert batches is not None
    transforms = predict_data.predict_dataloader().dataset.transform.transforms
    assert [list(t.size) for t in transforms if isinstance(t, v2.CenterCrop)] == [[28, 28]]
    probs = torch.cat([b["probs"] for b in batches])  # type: ignore[index]
    paths = [p for b in batches for p in b["paths"]]  # type: ignore[index]
    assert probs.shape == (18, 3) and len(paths) == 18
    assert torch.allclose(probs.sum(-1), torch.ones(18), atol=1e-6)
    assert (probs >= 0).all()


def test_predict_step_returns_paths_and_probabilities() -> None:
    model = _model().eval()
    out = model.predict_step((torch.randn(3, 3, 32, 32), ["a.png", "b.png", "c.png"]), 0)
    assert out["paths"] == ["a.png", "b.png", "c.png"]
    assert out["probs"].shape == (3, 3)
    assert torch.allclose(out["probs"].sum(-1), torch.ones(3))


class _TwoInputs(Backbone):
    """A backbone whose inputs are a mapping of tensors (as a tokenizer's ``input_ids`` / ``attention_mask``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.mix = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.num_features = 8

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return self.mix((self.embed(inputs["input_ids"]) * mask).sum(1) / mask.sum(1))


class _MappingData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        ids = torch.tensor([i % 20, (3 * i) % 20, 1, 0])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}, i % 2


@pytest.mark.parametrize("mode", ["finetune", "progressive", "linear_probe"])
def test_a_batch_whose_inputs_are_a_mapping_of_tensors_trains_in_every_mode(mode: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TransferModule(_TwoInputs(), num_classes=2, mode=mode, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = torch.utils.data.DataLoader(_MappingData(), batch_size=4)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader, loader)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert {n for n in changed if n.startswith("head.")} == {"head.0.weight", "head.0.bias"}
    assert bool({n for n in changed if n.startswith("backbone.")}) == (mode == "finetune")
    assert "val_acc" in trainer.callback_metrics
