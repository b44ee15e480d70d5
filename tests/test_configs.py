"""Every recipe in configs/ parses with the CLI's parser; the debug recipe runs end to end (fit, test, predict)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from conftest import COLORS, make_image_folder
from lightning.pytorch import LightningDataModule

from transfer_lit import ImageDataModule, Preprocessing, TransferModule
from transfer_lit.cli import TransferCLI, build_cli, main
from transfer_lit.schedulers import WarmupDecay

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
TEXT_RECIPES = [r for r in RECIPES if r.stem.startswith("text_")]
IMAGE_RECIPES = [r for r in RECIPES if r not in TEXT_RECIPES]
DEBUG = CONFIGS / "debug.yaml"

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


class ParseOnlyCLI(TransferCLI):
    """The CLI's parser and checks without building anything: no weights, data or network needed."""

    def instantiate_classes(self) -> None:
        pass


class ModelOnlyCLI(TransferCLI):
    """Builds the model, data and callbacks but no Trainer (multi-GPU recipes cannot build one on CPU)."""

    def instantiate_trainer(self, **kwargs: object) -> None:  # type: ignore[override]
        return None


def _backbone_name(recipe: Path) -> str:
    return yaml.safe_load(recipe.read_text())["model"]["backbone"]["init_args"].get("name", "")


# Random init of these takes minutes on a CPU; their configs are still parsed by test_recipe_parses.
HUGE = {"vit_l_16", "vit_l_32", "vit_h_14", "regnet_y_128gf"}
BUILDABLE = [pytest.param(r, id=r.stem, marks=[pytest.mark.slow] if _backbone_name(r) in HUGE else [])
             for r in IMAGE_RECIPES]


def test_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "linear_probe", "finetune", "debug"} <= names
    documented = (CONFIGS / "README.md").read_text()
    assert all(f"{name}.yaml" in documented for name in names), "configs/README.md must list every recipe"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(recipe: Path) -> None:
    # As transfer-lit parses them: `data` in subclass mode, images when the recipe names no class.
    cli = ParseOnlyCLI(TransferModule, LightningDataModule, subclass_mode_data=True, run=False,
                       args=["--config", str(recipe)])
    raw = yaml.safe_load(recipe.read_text())
    config = cli.config
    assert config.model.backbone.class_path == raw["model"]["backbone"]["class_path"]
    assert config.model.mode == raw["model"].get("mode", "finetune")
    assert "num_classes" not in raw["model"], "the number of classes comes from the data"
    assert config.trainer.max_epochs == raw["trainer"]["max_epochs"]
    expected = "transfer_lit.TextDataModule" if recipe in TEXT_RECIPES else "transfer_lit.ImageDataModule"
    assert config.data.class_path == expected


@pytest.mark.parametrize("recipe", TEXT_RECIPES, ids=lambda p: p.stem)
def test_text_recipe_trains_for_real_with_its_schedule_sized_from_the_run(
        recipe: Path, tmp_path: Path, sentiment_files: dict[str, Path], one_thread: None) -> None:
    pytest.importorskip("transformers")
    from conftest import make_text_model

    from transfer_lit.schedulers import WarmupDecay

    model = make_text_model(tmp_path / "tiny-bert", sentence_transformers=True, layers=6)  # MiniLM's six layers
    args = ["fit", "--config", str(recipe), "--model.backbone.init_args.model", str(model), "--data.train_csv",
            str(sentiment_files["train"]), "--data.val_csv", str(sentiment_files["val"]), "--trainer.accelerator",
            "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "8"]
    cli = build_cli(args)
    raw = yaml.safe_load(recipe.read_text())
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupDecay)
    expected = (raw["trainer"]["max_epochs"] * 6 if raw["model"].get("scheduler_interval") == "step"
                else raw["trainer"]["max_epochs"])  # 48 texts / 8 per batch = 6 steps per epoch
    assert scheduler.total_steps == expected and scheduler.last_epoch == expected
    assert all(lr == pytest.approx(0.0, abs=1e-12) for lr in scheduler.get_last_lr())  # decayed to the end
    assert cli.model.mode == raw["model"]["mode"] and cli.model.frozen_blocks == (
        set(cli.model.backbone.block_names()) if raw["model"]["mode"] == "linear_probe" else set())
    assert list((tmp_path / "runs").rglob("last.ckpt"))


@pytest.mark.parametrize("recipe", BUILDABLE)
def test_recipe_builds_offline_with_random_weights(recipe: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"train": 2, "val": 1}, size=8)
    args = ["--config", str(recipe), "--model.backbone.init_args.weights", "null", "--data.root", str(root)]
    cli = ModelOnlyCLI(TransferModule, ImageDataModule, run=False, args=args)
    model, raw = cli.model, yaml.safe_load(recipe.read_text())["model"]
    assert isinstance(model, TransferModule) and isinstance(cli.datamodule, ImageDataModule)
    assert model.num_classes == 3 and model.class_names == sorted(COLORS)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(raw.get("lr", 1e-3))
    if raw.get("mode") == "finetune":
        assert max(v for k, v in lrs.items() if k.startswith("backbone.")) == pytest.approx(
            raw.get("lr", 1e-3) * raw.get("backbone_lr_mult", 0.01))


def test_finetune_is_the_classic_recipe(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"train": 2, "val": 1}, size=8)
    args = ["--config", str(CONFIGS / "finetune.yaml"), "--model.backbone.init_args.weights", "null",
            "--data.root", str(root)]
    cli = TransferCLI(TransferModule, ImageDataModule, run=False, args=[*args, "--trainer.accelerator", "cpu"])
    model = cli.model
    model.trainer = cli.trainer
    config = model.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert type(config["optimizer"]) is torch.optim.AdamW
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["head"]["weight_decay"] == pytest.approx(0.01)
    backbone = [g for name, g in groups.items() if name.startswith("backbone.") and not name.endswith("no_decay")]
    assert backbone and all(g["lr"] == pytest.approx(1e-4) and g["weight_decay"] == pytest.approx(0.01)
                            for g in backbone)
    assert all(g["weight_decay"] == 0 for name, g in groups.items() if name.endswith("no_decay"))
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, WarmupDecay) and scheduler.decay == "cosine" and scheduler.warmup == 0
    # sized from the run (max_epochs: 8), not a literal T_max that goes stale when --trainer.max_epochs changes
    assert config["lr_scheduler"]["interval"] == "epoch" and scheduler.total_steps == 8


# ----------------------------------------------------------------- debug recipe end to end


def test_debug_recipe_fit_test_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "images", {"train": 8, "val": 4, "test": 4}, size=40)
    runs = tmp_path / "runs"
    common = ["--config", str(DEBUG), "--data.root", str(root), "--trainer.default_root_dir", str(runs)]

    main(["fit", *common])
    (last,) = runs.rglob("last.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    saved = Preprocessing.from_dict(checkpoint["transfer_lit"]["preprocessing"])
    assert (saved.resize_size, saved.crop_size) == (36, 32)
    assert checkpoint["transfer_lit"]["class_names"] == sorted(COLORS)
    assert checkpoint["hyper_parameters"]["num_classes"] == 3

    capsys.readouterr()
    main(["test", *common, "--ckpt_path", str(last)])
    out = capsys.readouterr().out
    assert "test_acc" in out and "confusion matrix" in out
    for name in COLORS:
        assert f"\n{name}" in out

    # Predict as the README shows it (no data.root: classes come from the checkpoint) and without the
    # preprocessing override: the checkpoint's own preprocessing must be used.
    output = tmp_path / "predictions.csv"
    cli = TransferCLI(
        TransferModule,
        ImageDataModule,
        args=["predict", "--config", str(DEBUG), "--trainer.default_root_dir", str(runs),
              "--model.preprocessing", "null", "--data.predict_root", str(root / "test"),
              "--ckpt_path", str(last), "--prediction_writer.output", str(output)],
        save_config_kwargs={"overwrite": True},
    )
    # LightningCLI read the hyperparameters back from --ckpt_path over the command line's `null` ...
    assert dict(cli.config.predict.model.preprocessing) == {"resize_size": 36, "crop_size": 32}
    # ... and the module then restored the checkpoint's resolved preprocessing.
    assert cli.model.preprocessing == saved
    assert cli.model.class_names == sorted(COLORS)
    x, _ = next(iter(cli.datamodule.predict_dataloader()))
    assert x.shape[-2:] == (32, 32)

    with output.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "prediction", "probability", *(f"p_{c}" for c in sorted(COLORS))]
    images = sorted(str(p) for p in (root / "test").rglob("*.png"))
    assert sorted(r[0] for r in rows[1:]) == images
    for _, prediction, probability, *every in rows[1:]:
        assert abs(sum(map(float, every)) - 1) < 1e-4 and float(probability) == max(map(float, every))
        assert prediction in COLORS
        assert 1 / 3 <= float(probability) <= 1  # the top class of a 3-way softmax
