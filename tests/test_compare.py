"""``transfer-lit compare`` on a tiny real image folder: the split, the search, the pick, the files, and the
same JSON again for the same seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_image_folder

from transfer_lit.cli import TransferCLI, main
from transfer_lit.compare import summarize

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def recipe(folder: Path, mode: str) -> Path:
    config = yaml.safe_load(DEBUG.read_text())
    config["model"]["mode"] = mode
    config["trainer"]["limit_test_batches"] = None  # every held-out image
    path = folder / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_selects_on_validation_and_reports_on_held_out_images(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_image_folder(tmp_path / "images", {"train": 8, "val": 6})  # no test/: val is cut in two
    args = ["compare", "--data.root", str(images), "--strategies", "linear_probe,finetune", "--seeds", "2",
            "--epochs", "1", "--backbone_lr_mults", "0.1,1",
            "--recipe", f"linear_probe={recipe(tmp_path, 'linear_probe')}",
            "--recipe", f"finetune={recipe(tmp_path, 'finetune')}",
            "--model.preprocessing", "{resize_size: 30, crop_size: 28}"]  # an extra fit argument, for every run
    main([*args, "--output_dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert "| strategy | held-out acc |" in out and "winning recipe:" in out
    assert summary["pick"] in ("linear_probe", "finetune")
    probe, finetune = summary["strategies"]["linear_probe"], summary["strategies"]["finetune"]
    assert probe["seeds"] == finetune["seeds"] == 2 and probe["backbone_lr_mult"] is None
    assert finetune["backbone_lr_mult"] in (0.1, 1.0)
    assert all(0 <= r["accuracy_mean"] <= 1 and "ece_mean" in r and "f1_mean" in r for r in (probe, finetune))
    split = tmp_path / "a" / "split"
    for name in ("red", "green", "blue"):
        val = {p.name for p in (split / "val" / name).iterdir()}
        test = {p.name for p in (split / "test" / name).iterdir()}
        assert len(val) == len(test) == 3 and not val & test  # selection and reporting never share an image
    best = yaml.safe_load((tmp_path / "a" / "best.yaml").read_text())
    # the winner's own config: the recipe, the split, the epochs, the multiplier and compare's extra fit arguments
    assert best["data"]["init_args"]["root"] == str(split) and best["trainer"]["max_epochs"] == 1
    assert best["model"]["init_args"]["preprocessing"] == {"resize_size": 30, "crop_size": 28}
    assert best["trainer"]["default_root_dir"] == "outputs/best"
    assert set(summary["search"]["finetune"]) == {"0.1", "1.0"}
    assert "transfer-lit compare: run 5/5: finetune" in out
    cli = TransferCLI(run=False, args=["--config", str(tmp_path / "a" / "best.yaml")])  # a recipe fit accepts
    pick = summary["strategies"][summary["pick"]]
    assert cli.model.mode == summary["pick"] and cli.model.preprocessing.crop_size == 28
    assert pick["backbone_lr_mult"] is None or cli.model.policy.backbone_lr_mult == pick["backbone_lr_mult"]
    assert json.loads((tmp_path / "a" / "compare.json").read_text()) == summary
    assert (tmp_path / "a" / "compare.md").is_file()


def test_the_same_seeds_give_the_same_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_image_folder(tmp_path / "images", {"train": 8, "val": 6})
    args = ["compare", "--data.root", str(images), "--strategies", "finetune", "--seeds", "1", "--epochs", "1",
            "--backbone_lr_mults", "1", "--recipe", f"finetune={recipe(tmp_path, 'finetune')}"]
    summaries = []
    for out in ("a", "b"):
        main([*args, "--output_dir", str(tmp_path / out)])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        summaries.append({k: {m: v for m, v in r.items() if m != "wall_s"} for k, r in summary["strategies"].items()})
    assert summaries[0] == summaries[1]


def test_the_pick_prefers_the_cheaper_of_two_equals() -> None:
    def runs(selection: list[float], wall: float) -> list[dict[str, float]]:
        return [{"acc": 0.8, "selection_acc": v, "wall_s": wall} for v in selection]

    mults = {"linear_probe": None, "finetune": 0.1}
    # finetune leads (0.84 +- 0.057), the probe is within that std and 5 x cheaper: the probe
    assert summarize({"linear_probe": runs([0.81, 0.83], 10), "finetune": runs([0.80, 0.88], 50)}, mults)["pick"] \
        == "linear_probe"
    # a clear lead (0.84 +- 0.014 against 0.82): finetune
    assert summarize({"linear_probe": runs([0.81, 0.83], 10), "finetune": runs([0.83, 0.85], 50)}, mults)["pick"] \
        == "finetune"


def test_a_folder_without_val_is_refused_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--data.root", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "compare --data.root=" in capsys.readouterr().err


def test_the_few_shot_protocol_reports_each_k_with_a_95_percent_interval(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_image_folder(tmp_path / "images", {"train": 6, "val": 6})
    main(["compare", "--data.root", str(images), "--strategies", "finetune", "--seeds", "2", "--epochs", "1",
          "--backbone_lr_mults", "1", "--recipe", f"finetune={recipe(tmp_path, 'finetune')}",
          "--samples_per_class", "1,3", "--output_dir", str(tmp_path / "out")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples_per_class"] == [1, 3] and result["seeds"] == 2
    for k in ("1", "3"):
        row = result["strategies"]["finetune"][k]
        low, high = row["ci95"]
        assert 0 <= low <= row["accuracy_mean"] <= high <= 1
    # each seed drew its own k images per class: the runs of k=1 trained on different files
    logs = sorted((tmp_path / "out" / "k1" / "runs" / "finetune").rglob("config.yaml"))
    seeds = {yaml.safe_load(p.read_text())["data"]["init_args"]["seed"] for p in logs}
    assert seeds == {0, 1}
    assert (tmp_path / "out" / "few_shot.md").is_file() and (tmp_path / "out" / "few_shot.png").is_file()


def test_every_fit_gets_the_same_budget_of_epochs_time_and_patience(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    images = make_image_folder(tmp_path / "images", {"train": 8, "val": 6})
    frozen = recipe(tmp_path, "linear_probe")  # lr 1e-12: the selection accuracy cannot improve after epoch 0
    args = ["compare", "--data.root", str(images), "--strategies", "linear_probe", "--seeds", "1", "--epochs", "6",
            "--recipe", f"linear_probe={frozen}", "--model.lr", "1e-12"]
    main([*args, "--patience", "2", "--output_dir", str(tmp_path / "patience")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["budget"] == {"epochs": 6, "max_minutes": None, "patience": 2}
    assert summary["strategies"]["linear_probe"]["epochs_mean"] == 3  # epoch 0, then 2 without improvement
    many = [*args[: args.index("--epochs") + 1], "300", *args[args.index("--epochs") + 2:]]  # far more than 1 s
    main([*many, "--max_minutes", "0.0001", "--output_dir", str(tmp_path / "time")])  # rounds up to 1 s
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["budget"]["max_minutes"] == 0.0001 and summary["strategies"]["linear_probe"]["epochs_mean"] < 300
    with pytest.raises(SystemExit) as stop:
        main([*args, "--patience", "0", "--output_dir", str(tmp_path / "bad")])
    assert stop.value.code == 2 and "argument --patience: '0' is not a positive int" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--recipe", "finetune"], "argument --recipe: 'finetune' is not STRATEGY=FILE"),
    (["--backbone_lr_mults", "0.1,x"], "argument --backbone_lr_mults: 'x' is not a positive float"),
    (["--backbone_lr_mults", "0.1,0"], "argument --backbone_lr_mults: '0' is not a positive float"),
    (["--samples_per_class", "1,0"], "argument --samples_per_class: '0' is not a positive int"),
    (["--seeds", "0"], "argument --seeds: '0' is not a positive int"),
    (["--max_minutes", "-1"], "argument --max_minutes: '-1' is not a positive float"),
])
def test_bad_compare_options_are_one_message_before_any_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             args: list[str], message: str) -> None:
    images = make_image_folder(tmp_path / "images", {"train": 2, "val": 2})
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--data.root", str(images), "--output_dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before the split or any fit


def test_an_auroc_the_held_out_split_cannot_define_is_null_and_n_a(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A held-out test/ without a class: AUROC is undefined (NaN), so ``null`` in compare.json (strict JSON, not the
    bare ``NaN`` Python writes) and ``n/a`` in the table; the other metrics are still numbers."""
    images = make_image_folder(tmp_path / "images", {"train": 8, "val": 4, "test": 4})
    for file in (images / "test" / "blue").iterdir():
        file.unlink()
    (images / "test" / "blue").rmdir()
    main(["compare", "--data.root", str(images), "--strategies", "linear_probe", "--seeds", "1", "--epochs", "1",
          "--recipe", f"linear_probe={recipe(tmp_path, 'linear_probe')}", "--output_dir", str(tmp_path / "a")])
    capsys.readouterr()
    text = (tmp_path / "a" / "compare.json").read_text()
    probe = json.loads(text, parse_constant=lambda name: pytest.fail(f"compare.json holds {name}"))
    probe = probe["strategies"]["linear_probe"]
    assert probe["auroc_mean"] is None and probe["auroc_std"] is None
    assert isinstance(probe["f1_mean"], float) and isinstance(probe["ece_mean"], float)
    row = next(line for line in (tmp_path / "a" / "compare.md").read_text().splitlines()
               if line.startswith("| linear_probe"))
    assert row.split(" | ")[3] == "n/a"
