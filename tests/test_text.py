"""TextDataModule (transfer_lit.data.text): splits and classes, the checkpoint's tokenizer, every training mode, and
predict after a reload tokenizing exactly as training did."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_sentiment_rows, make_text_model, write_tsv
from lightning.pytorch import Trainer

from transfer_lit import (
    HFTextBackbone,
    ImageDataModule,
    ProgressiveUnfreezing,
    TextDataModule,
    TextPreprocessing,
    TransferModule,
)
from transfer_lit.cli import main

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def _trainer(tmp_path: Path, epochs: int = 1, **kwargs: Any) -> Trainer:
    return Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def _module(model: Path, data: TextDataModule, **kwargs: Any) -> TransferModule:
    return TransferModule(HFTextBackbone(str(model)), num_classes=data.num_classes, class_names=data.class_names,
                          **kwargs)


def test_classes_splits_and_subsamples(sentiment_files: dict[str, Path]) -> None:
    data = TextDataModule(train_csv=str(sentiment_files["train"]), val_fraction=0.25, seed=1)
    assert data.class_names == ["neg", "pos"] and data.num_classes == 2
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 36, "val": 12}
    assert data.class_counts("val") == {"neg": 6, "pos": 6}
    again = TextDataModule(train_csv=str(sentiment_files["train"]), val_fraction=0.25, seed=1)
    assert again.splits == data.splits
    assert [label for _, label in data.splits["val"][:2]] == [0, 1]  # classes interleaved for partial validation
    few = TextDataModule(train_csv=str(sentiment_files["train"]), val_csv=str(sentiment_files["val"]),
                         samples_per_class=3)
    assert few.class_counts() == {"neg": 3, "pos": 3}
    sub = TextDataModule(train_csv=str(sentiment_files["train"]), val_csv=str(sentiment_files["val"]),
                         train_samples=10)
    assert sub.class_counts() == {"neg": 5, "pos": 5}


def test_numeric_labels_sort_as_numbers(tmp_path: Path) -> None:
    rows = [(f"text {i}", str(label)) for i, label in enumerate([10, 2, 1, 10, 2, 1])]
    data = TextDataModule(train_csv=str(write_tsv(tmp_path / "t.tsv", rows)), val_fraction=0.5)
    assert data.class_names == ["1", "2", "10"]


def test_a_label_only_in_val_is_one_clear_error(tmp_path: Path, sentiment_files: dict[str, Path]) -> None:
    val = write_tsv(tmp_path / "v.tsv", [("good film", "pos"), ("fine", "neutral")])
    with pytest.raises(ValueError, match=r"labels \['neutral'\] appear in val but not in train; train labels are "
                                         r"\['neg', 'pos'\]"):
        TextDataModule(train_csv=str(sentiment_files["train"]), val_csv=str(val))


def test_bad_arguments_name_the_key(sentiment_files: dict[str, Path]) -> None:
    train = str(sentiment_files["train"])
    with pytest.raises(ValueError, match=r"data\.tokenize must be one of"):
        TextDataModule(train_csv=train, tokenize="lazy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data\.batch_size must be a positive integer, got 0"):
        TextDataModule(train_csv=train, batch_size=0)
    with pytest.raises(ValueError, match=r"give exactly one of data\.train_csv or data\.root"):
        TextDataModule()


def test_a_folder_of_txt_files_per_class(tmp_path: Path) -> None:
    for split, rows in (("train", make_sentiment_rows(8)), ("val", make_sentiment_rows(4, seed=1))):
        for i, (text, label) in enumerate(rows):
            (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / split / label / f"{i}.txt").write_text(text)
    data = TextDataModule(root=str(tmp_path))
    assert data.class_names == ["neg", "pos"] and {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 4}


def test_texts_longer_than_max_length_are_counted_once(text_model: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    rows = [(" ".join(["good"] * (40 if i < 3 else 3)), "pos" if i % 2 else "neg") for i in range(10)]
    data = TextDataModule(train_csv=str(write_tsv(tmp_path / "t.tsv", rows)),
                          val_csv=str(write_tsv(tmp_path / "v.tsv", rows[5:])),
                          preprocessing=TextPreprocessing(str(text_model), max_length=16))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            batch, _ = next(iter(data.train_dataloader()))
    notes = [r.getMessage() for r in caplog.records if "longer than max_length" in r.getMessage()]
    assert len(notes) == 1 and "3 of 10 train texts (30.0%)" in notes[0] and "max_length=16" in notes[0]
    assert batch["input_ids"].shape[1] <= 16


def test_upfront_and_worker_tokenization_give_the_same_batches(text_model: Path,
                                                              sentiment_files: dict[str, Path]) -> None:
    p = TextPreprocessing(str(text_model), max_length=16)
    kwargs = {"train_csv": str(sentiment_files["train"]), "val_csv": str(sentiment_files["val"]), "preprocessing": p}
    a = list(TextDataModule(**kwargs).val_dataloader())  # type: ignore[arg-type]
    b = list(TextDataModule(tokenize="workers", num_workers=1, **kwargs).val_dataloader())  # type: ignore[arg-type]
    assert len(a) == len(b)
    for (x, y), (u, v) in zip(a, b, strict=True):
        assert torch.equal(y, v) and all(torch.equal(x[k], u[k]) for k in x)


def test_padding_max_length_pads_every_batch(text_model: Path, sentiment_files: dict[str, Path]) -> None:
    p = TextPreprocessing(str(text_model), max_length=24, padding="max_length")
    data = TextDataModule(train_csv=str(sentiment_files["train"]), preprocessing=p)
    assert {x["input_ids"].shape[1] for x, _ in data.val_dataloader()} == {24}


def test_the_modalities_must_match(text_model: Path, sentiment_files: dict[str, Path], tiny_backbone: Any,
                                   image_folder: Path, tmp_path: Path) -> None:
    data = TextDataModule(train_csv=str(sentiment_files["train"]))
    images = TransferModule(tiny_backbone, num_classes=2)
    with pytest.raises(ValueError, match="TextDataModule reads texts, but the model's backbone takes 'image' inputs"):
        _trainer(tmp_path).fit(images, data)
    texts = _module(text_model, data)
    with pytest.raises(ValueError, match="ImageDataModule reads images, but the model's backbone takes 'text'"):
        _trainer(tmp_path).fit(texts, ImageDataModule(root=str(image_folder)))


@pytest.mark.parametrize("mode", ["linear_probe", "finetune", "progressive"])
def test_every_mode_trains(mode: str, text_model: Path, sentiment_files: dict[str, Path], tmp_path: Path,
                           one_thread: None) -> None:
    data = TextDataModule(train_csv=str(sentiment_files["train"]), val_csv=str(sentiment_files["val"]), batch_size=8,
                          cache_features=mode == "linear_probe")
    model = _module(text_model, data, mode=mode, lr=3e-3, backbone_lr_mult=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callbacks = [ProgressiveUnfreezing(schedule={1: ["layer.1"], 2: "all"})] if mode == "progressive" else []
    trainer = _trainer(tmp_path, epochs=5 if mode == "progressive" else 3, callbacks=callbacks)
    trainer.fit(model, data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if mode == "linear_probe":  # the tiny encoder is random: its frozen features are not worth a threshold
        assert {n.split(".")[0] for n in changed} == {"head"}
        assert data.feature_cache.misses == 2  # each split extracted once, for all 3 epochs
    else:  # the sentiment word decides the label: the encoder learns it
        assert any(n.startswith("backbone.model.embeddings") for n in changed) and model.frozen_blocks == set()
        assert float(trainer.callback_metrics["val_acc"]) >= 0.75


def test_predict_after_reload_tokenizes_identically_and_writes_every_class(
        text_model: Path, sentiment_files: dict[str, Path], tmp_path: Path, one_thread: None) -> None:
    runs = tmp_path / "runs"
    common = ["--model.backbone", "transfer_lit.HFTextBackbone", "--model.backbone.model", str(text_model),
              "--data", "transfer_lit.TextDataModule", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(runs)]
    main(["fit", *common, "--data.train_csv", str(sentiment_files["train"]), "--data.val_csv",
          str(sentiment_files["val"]), "--trainer.max_epochs", "1", "--model.preprocessing", '{"max_length": 12}'])
    last = next(runs.rglob("last.ckpt"))
    saved = torch.load(last, weights_only=False)["transfer_lit"]["preprocessing"]
    assert saved["modality"] == "text" and saved["max_length"] == 12 and len(saved["tokenizer_hash"]) == 64

    texts = [text for text, _ in make_sentiment_rows(6, seed=5)] + ["the film was " + "good " * 30]
    predict = write_tsv(tmp_path / "new.tsv", [(t, "") for t in texts], header=None)
    predict.write_text("text\n" + "\n".join(texts) + "\n")
    output = tmp_path / "predictions.csv"
    # No --data class and no recipe: the checkpoint says it is a text model.
    main(["predict", "--ckpt_path", str(last), "--data.predict_csv", str(predict), "--prediction_writer.output",
          str(output), "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(runs)])
    with output.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["text", "prediction", "probability", "p_neg", "p_pos"]
    assert [r[0] for r in rows[1:]] == texts

    # The reloaded model and data give bit-identical logits to the trained one on the same texts.
    trained = TransferModule.load_from_checkpoint(last).eval()
    data = TextDataModule(predict_csv=str(predict), batch_size=4,
                          preprocessing=TextPreprocessing.from_dict(saved))  # type: ignore[arg-type]
    logits = torch.cat([trained(x) for x, _ in data.predict_dataloader()]).detach()
    probabilities = torch.tensor([[float(v) for v in r[3:]] for r in rows[1:]])
    torch.testing.assert_close(probabilities, logits.softmax(dim=1), atol=1e-6, rtol=0)
    again = torch.cat([trained(x) for x, _ in data.predict_dataloader()]).detach()
    assert torch.equal(logits, again)
    assert max(len(x["input_ids"][0]) for x, _ in data.predict_dataloader()) == 12  # the long text was cut


def test_a_checkpoint_with_a_different_tokenizer_is_refused(text_model: Path, sentiment_files: dict[str, Path],
                                                            tmp_path: Path) -> None:
    data = TextDataModule(train_csv=str(sentiment_files["train"]), val_csv=str(sentiment_files["val"]))
    model = _module(text_model, data)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_train_batches=1,
                      limit_val_batches=1)
    trainer.fit(model, data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    other = make_text_model(tmp_path / "other")
    (other / "vocab.txt").write_text((other / "vocab.txt").read_text().replace("good", "goood"))
    (other / "tokenizer.json").unlink()
    reloaded = TransferModule(HFTextBackbone(str(text_model)), num_classes=2,
                              preprocessing={"tokenizer": str(other)})
    with pytest.raises(ValueError, match=r"is not the tokenizer this checkpoint was trained with"):
        reloaded.on_load_checkpoint(torch.load(ckpt, weights_only=False))


def test_tokenizer_files_changed_since_training_are_refused(text_model: Path, tmp_path: Path,
                                                            sentiment_files: dict[str, Path]) -> None:
    copy = make_text_model(tmp_path / "copy")
    pinned = HFTextBackbone(str(copy)).preprocessing
    (copy / "vocab.txt").write_text((copy / "vocab.txt").read_text() + "extra\n")
    data = TextDataModule(train_csv=str(sentiment_files["train"]), preprocessing=pinned)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="are not the ones this model was trained with"):
        data.val_dataloader()


def test_a_text_recipe_with_a_missing_file_is_one_clear_error(text_model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    recipe = Path(__file__).resolve().parents[1] / "configs" / "text_finetune.yaml"
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(recipe), "--model.backbone.init_args.model", str(text_model),
              "--data.train_csv", str(tmp_path / "missing.tsv"), "--trainer.default_root_dir", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"transfer-lit: error: data.train_csv='{tmp_path / 'missing.tsv'}': no such file" in err
    assert "Traceback" not in err and "Union" not in err
