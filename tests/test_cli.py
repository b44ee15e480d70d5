"""The ``transfer-lit`` command: entry points, help, user errors without tracebacks, subcommands."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import COLORS, make_image_folder

from transfer_lit import ImageDataModule, ProgressiveUnfreezing, TransferModule
from transfer_lit.callbacks.phases import Phase
from transfer_lit.checkpoints import with_checkpoint_model
from transfer_lit.cli import TransferCLI, main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
SCRIPT = Path(sys.executable).with_name("transfer-lit")


def _env() -> dict[str, str]:
    return {**os.environ, "TRANSFER_LIT_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cli") / "images", {"train": 8, "val": 4, "test": 4})


@pytest.fixture(scope="module")
def trained(images: Path) -> tuple[list[str], Path]:
    """The debug recipe fitted once: its common arguments and its last checkpoint."""
    common = ["--config", str(DEBUG), "--data.root", str(images),
              "--trainer.default_root_dir", str(images.parent / "runs")]
    main(["fit", *common])
    (last,) = (images.parent / "runs").rglob("last.ckpt")
    return common, last


def _user_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process, expect exit status 2, return the error paragraph."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    paragraph = err[err.index("transfer-lit: error:"):].strip()
    assert "\n\n" not in paragraph
    assert paragraph.endswith("(run with --debug for the full traceback)")
    return paragraph


# ----------------------------------------------------------------- entry points and help


@pytest.mark.skipif(not SCRIPT.is_file(), reason=f"console script {SCRIPT} not installed (pip install -e .)")
def test_console_script_help(tmp_path: Path) -> None:
    result = _run([str(SCRIPT), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(sub in result.stdout for sub in ("fit", "validate", "test", "predict"))


def test_python_m_help(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "transfer_lit", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(sub in result.stdout for sub in ("fit", "validate", "test", "predict"))


def test_fit_help_is_short_and_points_at_each_class_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model CONFIG | CLASS_PATH_OR_NAME", "--data CONFIG | CLASS_PATH_OR_NAME",
                   "--prediction_writer.output", "--trainer.max_epochs"):
        assert option in out, option
    assert len(out.splitlines()) <= 650  # not every nn.Module subclass in torch


def test_the_model_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "TransferModule"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model.mode", "linear_probe", "progressive", "--model.backbone", "--model.lr",
                   "--model.backbone_lr_mult", "--model.preprocessing"):
        assert option in out, option


@pytest.mark.parametrize(("data", "options"), [
    ("ImageDataModule", ("--data.root", "--data.samples_per_class", "--data.bad_images")),
    ("TextDataModule", ("--data.train_csv", "--data.text_column", "--data.label_column", "--data.bucket_by_length")),
])
def test_each_data_module_lists_its_options(data: str, options: tuple[str, ...],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """As in any LightningCLI in subclass mode: ``--data.help <class>`` lists a data module's options."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.help", data])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, option


# ----------------------------------------------------------------- user errors: exit 2, one paragraph


def test_unknown_backbone_name(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _user_error(["fit", "--config", str(DEBUG), "--data.root", str(images),
                           "--model.backbone.init_args.name", "resnet5"], capsys)
    assert "model.backbone.name='resnet5'" in message
    assert "Did you mean" in message and "'resnet50'" in message


def test_unknown_weights(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _user_error(["fit", "--config", str(DEBUG), "--data.root", str(images),
                           "--model.backbone.init_args.weights", "IMAGENET1K_V9"], capsys)
    assert "model.backbone.weights='IMAGENET1K_V9'" in message
    assert "'IMAGENET1K_V1'" in message and "DEFAULT" in message


def test_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _user_error(["fit", "--config", str(DEBUG), "--data.root", str(tmp_path / "nowhere")], capsys)
    assert "data.root=" in message and "nowhere" in message and "no such directory" in message


def test_zero_batch_size(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _user_error(["fit", "--config", str(DEBUG), "--data.root", str(images), "--data.batch_size", "0"],
                          capsys)
    assert "data.batch_size must be a positive integer, got 0" in message


def test_invalid_choice_is_rejected_by_the_parser(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--model.mode", "frozen"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # One line with the whole key, the value and the valid ones (jsonargparse nests it under "model", then "mode").
    assert err.splitlines()[0] == ("transfer-lit fit: error: model.mode: got 'frozen'; valid: 'linear_probe', "
                                   "'finetune', 'progressive'")
    assert "Traceback" not in err and "usage:" not in err and len(err.splitlines()) == 2
    for args, line in ([["--model.lr", "fast"], "model.lr: Expected a <class 'float'>. Got value: fast"],
                       [["--model.backbone.init_args.nam", "x"], "model.backbone.nam: no such option"],
                       [["--trainer.max_epochs", "x"], "trainer.max_epochs: Expected a <class 'int'>"]):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(DEBUG), "--data.root", str(images), *args])
        assert capsys.readouterr().err.startswith(f"transfer-lit fit: error: {line}")


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.root="):
        main(["fit", "--config", str(DEBUG), "--data.root", str(tmp_path / "nowhere"), "--debug"])


def test_user_error_in_a_subprocess(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "transfer_lit", "fit", "--config", str(DEBUG), "--data.root", str(tmp_path / "no")]
    result = _run(args, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "transfer-lit: error: data.root=" in result.stderr

    debug = _run([*args, "--debug"], tmp_path)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "FileNotFoundError" in debug.stderr


# ----------------------------------------------------------------- classes flow from the data


def test_num_classes_flows_from_data_to_model(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"train": 2, "val": 1}, size=8)
    args = ["--config", str(DEBUG), "--data.root", str(root)]
    cli = TransferCLI(TransferModule, ImageDataModule, run=False, args=args)
    assert cli.model.num_classes == 3 and cli.model.class_names == sorted(COLORS)

    for name in ("green", "red"):
        for split in ("train", "val"):
            for file in (root / split / name).iterdir():
                file.unlink()
            (root / split / name).rmdir()
    with pytest.raises(ValueError, match=r"model\.num_classes must be >= 2"):
        TransferCLI(TransferModule, ImageDataModule, run=False, args=args)


def test_fit_keeps_the_class_names(trained: tuple[list[str], Path]) -> None:
    _, last = trained
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["num_classes"] == 3
    assert checkpoint["hyper_parameters"]["class_names"] == sorted(COLORS)
    assert checkpoint["transfer_lit"]["class_names"] == sorted(COLORS)
    head = [v for k, v in checkpoint["state_dict"].items() if k.startswith("head.") and k.endswith("weight")]
    assert head[-1].shape[0] == 3


# ----------------------------------------------------------------- validate and test subcommands


def _stdout_of(subcommand: str, trained: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``subcommand`` prints for the trained recipe's last checkpoint."""
    common, last = trained
    capsys.readouterr()
    main([subcommand, *common, "--ckpt_path", str(last)])
    return capsys.readouterr().out


def test_validate_subcommand(trained: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = _stdout_of("validate", trained, capsys)
    assert "val_acc" in out and "val_f1" in out


def test_test_subcommand_prints_report(trained: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = _stdout_of("test", trained, capsys)
    assert "test_acc" in out and "test_auroc" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["class", "precision", "recall", "f1",
                                                                            "support"])
    rows = [lines[header + 1 + i].split() for i in range(3)]
    assert [r[0] for r in rows] == sorted(COLORS)
    assert sum(int(r[4]) for r in rows) == 12  # every test image (4 per class)
    matrix = lines.index("confusion matrix (rows: true, columns: predicted)")
    counts = [[int(v) for v in lines[matrix + 2 + i].split()[1:]] for i in range(3)]
    assert [lines[matrix + 2 + i].split()[0] for i in range(3)] == sorted(COLORS)
    assert [sum(r) for r in counts] == [4, 4, 4]


# ----------------------------------------------------------------- a checkpoint is enough for predict / test


def test_predict_needs_only_the_checkpoint_and_the_images(trained: tuple[list[str], Path], tmp_path: Path) -> None:
    _, last = trained
    images = last.parents[4] / "images" / "test"
    output = tmp_path / "predictions.csv"
    main(["predict", "--ckpt_path", str(last), "--data.predict_root", str(images), "--data.num_workers", "0",
          "--prediction_writer.output", str(output), "--trainer.accelerator", "cpu",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["prediction"] for r in rows} <= set(COLORS)


def test_with_checkpoint_model_puts_the_checkpoint_first_and_leaves_other_commands_alone(
    trained: tuple[list[str], Path],
) -> None:
    _, last = trained
    argv = ["predict", "--data.predict_root", "x", "--ckpt_path", str(last), "--model.lr", "0.5"]
    extended = with_checkpoint_model(argv)
    assert extended[:2] == ["predict", "--model"] and extended[3:] == argv[1:]  # the command line still wins
    model = json.loads(extended[2])
    assert model["backbone"]["class_path"] == "transfer_lit.TorchvisionBackbone" and model["num_classes"] == 3
    assert with_checkpoint_model(["test", f"--ckpt_path={last}"])[1] == "--model"
    chosen = json.loads(with_checkpoint_model(argv, subclass_mode=True)[2])  # transfer-lit chooses the class
    assert chosen["class_path"] == "transfer_lit.TransferModule" and chosen["init_args"]["num_classes"] == 3
    for unchanged in (["predict", "--ckpt_path", "last"], ["fit", "--data.root", "x"],
                      ["predict", "--ckpt_path", str(last.parent / "missing.ckpt")], ["--ckpt_path"]):
        assert with_checkpoint_model(unchanged) == unchanged


def test_with_checkpoint_model_leaves_hyperparameters_it_cannot_use_and_names_unreadable_files(
        tmp_path: Path) -> None:
    odd, plain = tmp_path / "odd.ckpt", tmp_path / "plain.ckpt"
    torch.save({"hyper_parameters": {"backbone": b"bytes are not JSON"}}, odd)
    torch.save([1, 2, 3], plain)  # a torch file, but not a checkpoint: Lightning says so later
    for path in (odd, plain):
        argv = ["predict", "--ckpt_path", str(path)]
        assert with_checkpoint_model(argv) == argv
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"--ckpt_path='.*notes\.ckpt' is not a readable torch file \(16 bytes\)"):
        with_checkpoint_model(["predict", "--ckpt_path", str(text)])


@pytest.mark.parametrize("command", ["test", "validate"])
def test_ckpt_path_last_without_a_checkpoint_is_an_error_not_a_random_model(
        command: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _user_error([command, "--config", str(DEBUG), "--data.root", str(images), "--ckpt_path", "last",
                           "--trainer.default_root_dir", str(tmp_path / "never_fitted")], capsys)
    assert f"--ckpt_path last: no checkpoint to {command}" in message and "never_fitted" in message


def test_sync_batchnorm_is_switched_off_on_cpu_with_a_notice(images: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cli = TransferCLI(TransferModule, ImageDataModule, run=False,
                      args=["--config", str(DEBUG), "--data.root", str(images), "--trainer.sync_batchnorm=true",
                            "--trainer.default_root_dir", str(tmp_path)])
    assert cli.config.trainer.sync_batchnorm is False
    assert "trainer.sync_batchnorm=true is for GPUs" in capsys.readouterr().err


def test_class_names_outside_the_basic_plane_survive_the_checkpoint_round_trip(tmp_path: Path) -> None:
    import yaml

    names = ["\N{ANT}", "\N{HONEYBEE}", "caf\u00e9"]
    path = tmp_path / "emoji.ckpt"
    torch.save({"hyper_parameters": {"class_names": names, "num_classes": 3}}, path)
    extended = with_checkpoint_model(["predict", "--ckpt_path", str(path)])
    assert yaml.safe_load(extended[2])["class_names"] == names  # jsonargparse reads the value as YAML


def test_a_yaml_syntax_error_names_the_file_and_the_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("trainer:\n  max_epochs: 2\n   devices: [\n")
    message = _user_error(["fit", "--config", str(config)], capsys)
    assert f"--config {config}: not valid YAML at line 3, column 11" in message


def test_max_epochs_minus_one_says_it_trains_until_stopped(images: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--trainer.max_epochs", "-1",
          "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)])
    assert "training runs until stopped" not in capsys.readouterr().err  # max_steps bounds it
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--trainer.max_epochs", "-1",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.devices", "0"])  # stops before training
    assert "trainer.max_epochs=-1 and no max_steps / max_time: training runs until stopped" in capsys.readouterr().err


def test_partial_writes_of_killed_processes_are_removed_from_every_version_folder(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its temp files are stale
    stale = [tmp_path / "lightning_logs" / f"version_{v}" / "checkpoints" / f".last.ckpt.{pid}.tmp" for v in (0, 3)]
    alive = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / f".last.ckpt.{os.getpid()}.tmp"
    for temp in [*stale, alive]:
        temp.parent.mkdir(parents=True)
        temp.write_bytes(b"partial")
    main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert not any(t.exists() for t in stale) and alive.exists()  # a live process's write is left alone
    assert all(f"removed {t}, the partial write of a killed process" in err for t in stale)


def test_a_run_prints_each_epoch_and_none_of_lightnings_alarms(images: Path, tmp_path: Path) -> None:
    """Without a progress bar each epoch prints its validation line; the notices that only alarm are gone
    (warnings are not switched off for this subprocess: anything else would show)."""
    env = {k: v for k, v in _env().items() if k != "PYTHONWARNINGS"}
    common = [str(SCRIPT), "--config", str(DEBUG), "--data.root", str(images), "--trainer.default_root_dir",
              str(tmp_path / "runs")]
    fit = subprocess.run([common[0], "fit", *common[1:], "--trainer.max_epochs", "2"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    out = fit.stdout + fit.stderr
    epochs = [line for line in out.splitlines() if line.startswith("transfer-lit: epoch ")]
    assert [line.split(":")[1] for line in epochs] == [" epoch 0", " epoch 1"] and all("val_acc=" in e for e in epochs)
    last = next(line for line in out.splitlines() if line.startswith("transfer-lit: validation after epoch 1"))
    assert last.split(": ", 2)[2] == epochs[1].split(": ", 2)[2]  # the epoch line shows that epoch's metrics
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    test = subprocess.run([common[0], "test", *common[1:], "--ckpt_path", str(checkpoint)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert test.returncode == 0, test.stderr[-3000:]
    for noise in ("tensorboardX", "litlogger", "LeafSpec", "in eval mode", "dirpath has changed",
                  "callbacks used to create the checkpoint"):
        assert noise not in out + test.stdout + test.stderr, noise


@pytest.mark.parametrize("key", ["optimizer", "lr_scheduler"])
def test_lightnings_top_level_optimizer_is_refused_pointing_at_the_models(
        key: str, images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    value = "SGD" if key == "optimizer" else "StepLR"
    extra = ["--optimizer.lr", "0.1"] if key == "optimizer" else ["--lr_scheduler.step_size", "1"]
    message = _user_error(["fit", "--config", str(DEBUG), "--data.root", str(images), f"--{key}", value, *extra],
                          capsys)
    assert f"--{key} torch.optim." in message and f"give it to the model instead: --model.{key} torch.optim." in message


def test_version_and_the_top_level_help(tmp_path: Path) -> None:
    version = _run([str(SCRIPT), "--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("transfer-lit 0.") and "lightning 2." in version.stdout
    top = _run([str(SCRIPT), "--help"], tmp_path)
    assert "transfer-lit: transfer learning with PyTorch Lightning" in top.stdout and "--debug" in top.stdout
    assert "Lightning Trainer command line tool" not in top.stdout


def test_a_research_subclass_of_the_module_is_chosen_from_the_cli(images: Path, tmp_path: Path) -> None:
    """LightningCLI's subclass mode: ``--model <class>`` keeps the recipe's options, adds the subclass's own, and the
    classes still flow from the data (its hyperparameters let ``predict --ckpt_path`` rebuild it)."""
    from cli_research_module import FocalTransferModule

    FocalTransferModule.calls = 0
    runs = tmp_path / "runs"
    main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--model",
          "cli_research_module.FocalTransferModule", "--model.gamma", "1.5", "--trainer.default_root_dir", str(runs)])
    assert FocalTransferModule.calls > 0
    (last,) = runs.rglob("last.ckpt")
    hparams = torch.load(last, weights_only=False)["hyper_parameters"]
    assert hparams["_class_path"] == "cli_research_module.FocalTransferModule" and hparams["gamma"] == 1.5
    cli = TransferCLI(run=False, args=["--config", str(DEBUG), "--data.root", str(images), "--model",
                                       "cli_research_module.FocalTransferModule"])
    assert isinstance(cli.model, FocalTransferModule) and cli.model.num_classes == 3 and cli.model.gamma == 2.0


def test_what_is_shown_as_the_optimizer_lr_is_what_the_head_trained_at(images: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    main(["fit", "--config", str(DEBUG), "--data.root", str(images), "--model.lr", "0.05",
          "--trainer.default_root_dir", str(tmp_path)])
    (saved,) = tmp_path.rglob("config.yaml")
    assert yaml.safe_load(saved.read_text())["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.05
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=False)["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 0.05
    message = _user_error(["fit", "--config", str(DEBUG), "--data.root", str(images),
                           "--model.optimizer.init_args.lr", "0.3"], capsys)
    assert "model.optimizer.init_args.lr=0.3 is not used: every parameter group gets its own learning rate" in message


def test_print_config_shows_the_lr_the_head_trains_at(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(DEBUG.parent / "finetune.yaml"), "--model.lr", "0.005", "--print_config"])
    assert stop.value.code in (0, None)
    shown = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert shown["lr"] == 0.005 and shown["optimizer"]["init_args"]["lr"] == 0.005  # not AdamW's default 0.001
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])  # an incomplete configuration still prints, as jsonargparse does
    assert "trainer:" in capsys.readouterr().out


def test_print_schedule_prints_the_phases_and_yaml_that_fit_accepts_back(images: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = ["--config", str(DEBUG.with_name("progressive.yaml")), "--model.backbone.init_args.weights", "null",
              "--data.root", str(images), "--trainer.default_root_dir", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *recipe, "--print_schedule"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ProgressiveUnfreezing: 3 phases after the head-only phase 0, epoch-driven" in out
    assert "features.10, features.11, features.12, features.13" in out
    assert not (tmp_path / "runs").exists()  # nothing trained
    dumped = tmp_path / "schedule.yaml"
    dumped.write_text(out[out.index("trainer:"):])
    spec = yaml.safe_load(dumped.read_text())["trainer"]["callbacks"][0]["init_args"]
    assert spec["schedule"][4] == ["features.10", "features.11", "features.12", "features.13"]
    assert spec["warmup_steps"] == 20
    cli = TransferCLI(run=False, args=[*recipe, "--config", str(dumped)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ProgressiveUnfreezing)]
    assert callback.resolve_phases(cli.model.backbone.block_names()) == [
        Phase(1, ["features.17", "features.18"]), Phase(2, ["features.14", "features.15", "features.16"]),
        Phase(4, ["features.10", "features.11", "features.12", "features.13"])]
