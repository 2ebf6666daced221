"""tools/benchmark.py: one run per method as its own process, results.{json,md,png}, failures reported."""

import importlib.util
import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from ssl_vision.sweep import _fmt

from .conftest import TINY

BENCHMARK = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"
TINY_BENCH = (*TINY, "data.num_samples=64", "data.batch_size=16", "+trainer.limit_train_batches=1",
              "eval.random_init_baseline=false", "eval.knn.k=[5]", "plots=false")  # plots: tests/test_plots.py


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("ssl_vision_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(benchmark, tmp_path_factory):
    """Two tiny methods that train, and MAE on a ResNet, which fails at start-up: (exit code, out dir)."""
    out = tmp_path_factory.mktemp("bench") / "results"
    code = benchmark.main(["--methods", "simclr:resnet18_tiny", "moco_v2:resnet18_tiny", "mae:resnet18_tiny",
                           "--out", str(out), *TINY_BENCH])
    return code, out


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]


def test_successful_runs_are_tabulated_from_their_summaries(bench_run):
    code, out = bench_run
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["status"]) for r in records] == [("simclr", "ok"), ("moco_v2", "ok"), ("mae", "failed")]
    rows = table_rows((out / "results.md").read_text())
    assert len(rows) == 2  # no random-init rows: the baseline was switched off
    for r, row in zip(records, rows):
        summary = json.loads((out / f"{r['method']}_resnet18_tiny" / "summary.json").read_text())
        assert r["run_dir"] == str((out / f"{r['method']}_resnet18_tiny").resolve())
        assert r["command"].startswith(f"python -m ssl_vision.train method={r['method']} backbone=resnet18_tiny ")
        assert r["linear_probe_top1"] == summary["linear_probe_top1"] and r["knn_top1"] == summary["knn_top1"]
        assert row == [summary["method"], "resnet18_tiny", "1", _fmt(summary["linear_probe_top1"]),
                       _fmt(summary["linear_probe_top5"]), _fmt(summary["knn_top1"]),
                       f"{summary['train_seconds']:.1f}", f"{summary['peak_memory_mb']:.0f}"]
        assert summary["peak_memory_mb"] > 50 and summary["peak_memory_kind"] == "cpu_peak_rss"
        assert summary["steps"] == 1 and "plots" not in summary  # the overrides reached every run


def test_a_failed_method_is_reported_and_the_exit_code_is_nonzero(bench_run):
    code, out = bench_run
    assert code == 1
    failed = json.loads((out / "results.json").read_text())[2]
    assert failed["returncode"] == 2 and failed["error"].startswith("error: ") and "vit" in failed["error"].lower()
    md = (out / "results.md").read_text()
    assert f"FAILED: mae (resnet18_tiny): {failed['error']}" in md
    assert "Command: `python tools/benchmark.py --methods simclr:resnet18_tiny" in md and "Machine: " in md


def test_results_png_is_a_readable_chart(bench_run):
    _, out = bench_run
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(out / "results.png")
    assert image.shape[0] == 450 and image.shape[1] >= 500 and image.std() > 0


def test_method_defaults_apply_only_where_the_command_line_is_silent(benchmark):
    assert benchmark.run_overrides("mae", None, []) == ["method=mae", "backbone=vit_tiny"]
    assert benchmark.run_overrides("mae", "vit_small", ["x=1"]) == ["method=mae", "backbone=vit_small", "x=1"]
    assert benchmark.run_overrides("mae", None, ["backbone=vit_base"]) == ["method=mae", "backbone=vit_base"]
    assert benchmark.run_overrides("moco_v2", None, ["data=cifar10"]) == ["method=moco_v2", "data=cifar10"]
    assert benchmark.parse_entries(["simclr", "mae:vit_small", "simclr"]) == [("simclr", None), ("mae", "vit_small")]
    with pytest.raises(SystemExit, match="unknown method 'simclrr'"):
        benchmark.parse_entries(["simclrr"])


def test_baselines_are_drawn_and_listed_per_backbone(benchmark, tmp_path):
    ok = dict(status="ok", data="digits", epochs=5, linear_probe_top5=1.0, train_seconds=12.0, peak_memory_mb=900.0,
              peak_memory_kind="cpu_peak_rss")
    records = [dict(ok, method="simclr", backbone="resnet18", linear_probe_top1=0.95, knn_top1=0.93,
                    random_init_linear_probe_top1=0.87, random_init_knn_top1=0.75),
               dict(ok, method="mae", backbone="vit_tiny", linear_probe_top1=0.9, knn_top1=0.8,
                    random_init_linear_probe_top1=0.6, random_init_knn_top1=0.5)]
    rows = table_rows(benchmark.markdown(records, "cmd", "machine"))
    assert rows[2:] == [["random init", "resnet18", "0", "0.8700", "", "0.7500", "", ""],
                        ["random init", "vit_tiny", "0", "0.6000", "", "0.5000", "", ""]]
    assert mpimg.imread(benchmark.bar_chart(records, tmp_path / "r.png")).shape[:2] == (450, 520)


def test_a_previous_run_is_replaced_but_a_foreign_folder_is_kept(benchmark, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "console.log").write_text("error: a failed earlier run\n")
    benchmark._fresh_dir(tmp_path / "old")
    assert not (tmp_path / "old").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="is not empty and is not a previous run"):
        benchmark._fresh_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
