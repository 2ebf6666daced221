"""The CPU lane of tools/gpu_check.py (``--device cpu --tiny``): the GPU check cannot rot unnoticed.

The lane runs every section of the GPU check at tiny sizes through the same code: every method through the real
console entry point, a compiled backbone (aot_eager), bench.py's step / floor, the suite's data path against the
torchvision-worker pipeline, the evaluation probes, and the DDP equivalence step (1 process; 2 gloo ranks). It
must write its JSON record and Markdown table into the working directory with every section present and
successful. A second run kills its worker inside one section: that section is recorded as failed with its
error line, and the next section still runs in a new worker.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vision.methods import METHODS

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
SECTIONS = ["environment", "gather", "step_floor", "end_to_end", "methods", "probes"]  # what the issue asks for


def run_tool(cwd, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)


def output(r, tmp_path, name="gpu_check"):
    """What the tool printed, then the end of its workers' log (tracebacks)."""
    log = tmp_path / f"{name}.log"
    return (r.stdout + r.stderr)[-3000:] + "\n--- workers:\n" + (log.read_text()[-5000:] if log.is_file() else "")


def test_cpu_lane_writes_every_section_of_the_record(tmp_path):
    r = run_tool(tmp_path, "--device", "cpu", "--tiny")
    assert r.returncode == 0, output(r, tmp_path)
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["planned"] == SECTIONS and list(record["sections"]) == SECTIONS  # none missing, none extra
    for name in SECTIONS:
        assert record["sections"][name]["status"] == "ok", (name, record["sections"][name])
    assert record["status"] == "ok" and record["device"] == "cpu" and record["tiny"] is True
    assert not Path(record["workdir"]).exists()  # the synthetic JPEGs and run folders are removed

    # every registered method trained through the CLI, finite losses, both precisions covered; one compiled run
    runs = record["sections"]["methods"]["runs"]
    plain = [run for run in runs if not run["compile"]]
    assert sorted(run["method"] for run in plain) == sorted(METHODS)
    assert {run["precision"] for run in plain} == {"32-true", "bf16-mixed"}
    for run in runs:
        assert run["status"] == "ok" and run["steps"] == len(run["losses"]) == 2, run
        assert all(math.isfinite(v) for v in run["losses"]), run
    compiled = [run for run in runs if run["compile"]]
    assert len(compiled) == 1 and compiled[0]["compile_backend"] == "aot_eager" and compiled[0]["compiled_graphs"] > 0

    # step / floor: SimCLR and MAE, MAE also measured with its online probe every 10 steps (whole periods)
    floor = {run["method"]: run for run in record["sections"]["step_floor"]["runs"]}
    assert set(floor) == {"simclr", "mae"} and floor["simclr"]["step_over_floor"] > 0
    mae = floor["mae"]
    assert mae["probe_every"] == 10 and len(mae["amortized_step_samples_ms"]) == 10
    assert mae["amortized_step_over_network"] == pytest.approx(
        sum(mae["amortized_step_samples_ms"]) / 10 / mae["amortized_network_ms"])

    # end to end: both pipelines fed the same model for the timed steps
    (e2e,) = record["sections"]["end_to_end"]["runs"]
    for pipeline in ("suite", "torchvision_workers"):
        assert e2e[pipeline]["images_per_second"] > 0
        assert len(e2e[pipeline]["batch_end_seconds"]) == e2e["warmup_steps"] + e2e["timed_steps"]
    assert e2e["speedup"] == e2e["suite"]["images_per_second"] / e2e["torchvision_workers"]["images_per_second"]

    # probes: time and memory of the linear probe and the kNN, measured (the tiny lane never extrapolates)
    probes = record["sections"]["probes"]
    for key in ("linear", "knn"):
        assert probes[key]["seconds"] > 0 and probes[key]["peak_memory_mb"] >= 0 and not probes[key]["extrapolated"]

    # gather: 1 process and 2 gloo ranks, every method, within the tolerance
    checks = record["sections"]["gather"]["checks"]
    assert len(checks) == 2 and all(c["ok"] and set(c["methods"]) == set(METHODS) for c in checks)
    assert "2 gloo ranks" in checks[1]["what"]

    # the Markdown table: a row for every section; the GPU targets listed but not applied on the CPU
    table = (tmp_path / "gpu_check.md").read_text()
    for name in SECTIONS:
        assert f"| {name} |" in table, name
    assert len(record["targets"]) == 3 and all(t["applies"] is False for t in record["targets"])


def test_a_section_that_dies_is_recorded_and_the_next_still_runs(tmp_path):
    r = run_tool(tmp_path, "--device", "cpu", "--tiny", "--sections", "environment", "probes",
                 "--crash-in", "environment", "--out", "partial.json")
    assert r.returncode == 1, output(r, tmp_path, "partial")
    record = json.loads((tmp_path / "partial.json").read_text())
    env, probes = record["sections"]["environment"], record["sections"]["probes"]
    assert env["status"] == "failed" and env["error"].startswith("worker exited with code 9")
    assert probes["status"] == "ok" and record["status"] == "failed"
    assert "| environment | machine |  |  | FAILED: worker exited with code 9" in (tmp_path / "partial.md").read_text()


def test_the_gather_check_fails_a_step_with_per_rank_negatives(tmp_path, monkeypatch):
    """The 2-rank comparison's tolerance is tight enough to catch the classic DDP bug: SimCLR contrasting each
    rank's own samples only (no gather), while the same 2-rank launch with the gather passes (previous test)."""
    import torch

    import ssl_vision.methods.simclr as simclr

    sys.path.insert(0, str(TOOL.parent))
    import gather_check as G

    model = G.build("simclr", 16, 8, 32)
    views, indexes = G.fixed_views(model, 8, 16)
    single = G.one_step(model, views, indexes, torch.device("cpu"))
    monkeypatch.setattr(simclr, "gather_with_grad", lambda x: x)  # the forked ranks inherit the bug
    monkeypatch.setattr(simclr, "rank", lambda: 0)
    per_rank = G.run_two_ranks("gloo", ["simclr"], 8, 16, 32, "eval", str(tmp_path), "fork")["simclr"]
    found = G.difference(per_rank, single, G.RTOL_SAME_DEVICE, G.ATOL_SAME_DEVICE)
    assert not found["ok"] and found["worst_tolerance_ratio"] > 100, found


def test_the_table_says_pass_or_by_how_much_a_gpu_figure_misses():
    """The verdicts of a GPU record (only a GPU has one): each target's figure, pass, or the miss and its size."""
    sys.path.insert(0, str(TOOL.parent))
    import gpu_check

    record = {"planned": ["step_floor", "end_to_end"], "tiny": False, "sections": {
        "step_floor": {"status": "ok", "device": "cuda", "runs": [
            {"status": "ok", "method": "simclr", "backbone": "resnet50", "batch_size": 256, "precision": "bf16-mixed",
             "step_ms": 121.0, "floor_ms": 100.0, "step_over_floor": 1.21},
            {"status": "ok", "method": "mae", "backbone": "vit_base", "batch_size": 256, "precision": "bf16-mixed",
             "step_ms": 150.0, "floor_ms": 200.0, "network_ms": 100.0, "step_over_network": 1.5,
             "probe_every": 10, "amortized_step_ms": 114.0, "amortized_network_ms": 100.0,
             "amortized_step_over_network": 1.14}]},
        "end_to_end": {"status": "ok", "device": "cuda", "runs": [
            {"status": "ok", "backbone": "resnet18", "batch_size": 256, "precision": "bf16-mixed", "workers": 16,
             "suite": {"images_per_second": 3000.0}, "torchvision_workers": {"images_per_second": 1000.0},
             "speedup": 3.0}]}}}
    gpu_check.finish(record)
    verdicts = {t["key"]: t["verdict"] for t in record["targets"]}
    assert verdicts == {"end_to_end_resnet18": "pass", "simclr_step_over_floor": "MISS by 0.11 (10%)",
                        "mae_step_over_network_amortized": "pass"}
    table = gpu_check.markdown(record)
    assert "step 121.0 / floor 100.0 ms = 1.210 | <= 1.1 | MISS by 0.11 (10%) |" in table
    assert "= 3.00x | >= 2.0 | pass |" in table and "= 1.140 (probe.every_n_steps=10) | <= 1.15 | pass |" in table
    record["sections"]["end_to_end"]["runs"][0]["speedup"] = 1.5  # the suite only 1.5x the torchvision workers
    assert "MISS by 0.5 (25%)" in gpu_check.markdown(gpu_check.finish(record))
