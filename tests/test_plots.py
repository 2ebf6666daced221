"""Per-run plots: the pure plot functions, and a tiny run that writes them (or, plots=false, does not)."""

import json
import logging

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from ssl_vision import plots
from ssl_vision.train import run, write_plots

from .conftest import TINY

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Lightning CSVLogger style: sparse rows, each filling only the columns of one logging call
METRICS_CSV = """epoch,step,train/loss_epoch,train/loss_step,train/lr,train/probe_top1,val/probe_top1
0,0,,5.1,0.01,,
0,1,,4.9,0.02,,
0,1,,,,,0.30
0,1,5.0,,,0.25,
1,2,,4.7,0.03,,
1,3,,4.5,0.02,,
1,3,,,,,0.45
1,3,4.6,,,0.40,
"""


def read_png(path):
    """(height, width) of a PNG after checking its signature and that matplotlib decodes it."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.std() > 0  # not a blank canvas
    return image.shape[:2]


def expected_size(figsize):
    return round(figsize[1] * plots.DPI), round(figsize[0] * plots.DPI)


def test_read_columns_keeps_each_sparse_column_with_its_own_step_and_epoch(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS_CSV)
    cols = plots._read_columns(tmp_path / "metrics.csv")
    assert plots._curve(cols, "train/loss_step", 0) == ([0, 1, 2, 3], [5.1, 4.9, 4.7, 4.5])
    assert plots._curve(cols, "val/probe_top1", 1) == ([0, 1], [0.30, 0.45])
    assert plots._curve(cols, "train/lr", 0)[1] == [0.01, 0.02, 0.03, 0.02]
    assert plots._curve(cols, "absent", 0) == ([], [])


def test_training_curves_png(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS_CSV)
    out = plots.plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert read_png(out) == expected_size(plots.CURVES_SIZE)


def test_online_knn_is_drawn_with_the_online_probe(tmp_path):
    """val/knn_top1 (eval.online_knn) shares the probe panel, at its own epochs; absent, the panel is as before."""
    rows = METRICS_CSV.splitlines()
    with_knn = [rows[0] + ",val/knn_top1"] + [r + "," for r in rows[1:]] + ["1,3,,,,,,0.55"]
    (tmp_path / "metrics.csv").write_text("\n".join(with_knn) + "\n")
    probe_panel = plots.training_curves_figure(tmp_path / "metrics.csv").axes[1]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in probe_panel.get_lines()}
    assert lines["kNN (val)"] == ([1.0], [0.55]) and lines["probe (val)"] == ([0.0, 1.0], [0.30, 0.45])
    assert "kNN" in probe_panel.get_title()
    (tmp_path / "metrics.csv").write_text(METRICS_CSV)
    labels = [line.get_label() for line in plots.training_curves_figure(tmp_path / "metrics.csv").axes[1].get_lines()]
    assert labels == ["probe (val)", "probe (train)"]


def test_training_curves_without_probe_or_lr_columns(tmp_path):
    """An unlabelled run logs no probe: its panel is left with a note instead of failing."""
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss_step\n0,0,3.0\n0,1,2.5\n")
    assert read_png(plots.plot_training_curves(tmp_path / "metrics.csv", tmp_path / "c.png")) == \
        expected_size(plots.CURVES_SIZE)


def clustered(n_per_class=20, classes=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), dim, generator=g) + 6 * torch.eye(classes, dim)[y]
    return x, y


def test_embedding_png_separates_clusters(tmp_path):
    x, y = clustered()
    out = plots.plot_embedding(x, y, ["a", "b", "c"], tmp_path / "emb.png", seed=0)
    assert read_png(out) == expected_size(plots.EMBEDDING_SIZE)
    coords, keep, how = plots.embed_2d(x, seed=0)
    assert coords.shape == (60, 2) and how.startswith("t-SNE") and (keep == np.arange(60)).all()
    centers = np.stack([coords[y.numpy() == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(coords[y.numpy() == c] - centers[c], axis=1).mean() for c in range(3))
    assert min(np.linalg.norm(centers[i] - centers[j]) for i in range(3) for j in range(i)) > 2 * spread


def test_embedding_subsamples_deterministically_beyond_max_points():
    x, _ = clustered(n_per_class=40)
    c1, keep1, _ = plots.embed_2d(x, seed=3, max_points=50)
    c2, keep2, _ = plots.embed_2d(x, seed=3, max_points=50)
    _, keep3, _ = plots.embed_2d(x, seed=4, max_points=50)
    assert len(keep1) == 50 and (np.diff(keep1) > 0).all() and (keep1 == keep2).all() and (c1 == c2).all()
    assert not (keep1 == keep3).all()


def test_embedding_rejects_mismatched_labels(tmp_path):
    with pytest.raises(ValueError, match="60 features but 59 labels"):
        plots.plot_embedding(*clustered()[:1], torch.zeros(59, dtype=torch.long), None, tmp_path / "e.png")


def test_a_failing_plot_is_one_warning_and_the_others_are_written(tmp_path, caplog):
    """No metrics.csv: the curves fail with one warning; the embedding is still written and listed."""
    written = write_plots(tmp_path, clustered(), ["a", "b", "c"])
    assert written == [str(tmp_path / "embedding.png")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training_curves.png was not written" in warnings[0].getMessage()
    assert not (tmp_path / "training_curves.png").exists()


SMALL = (*TINY, "data.num_samples=64", "data.batch_size=16", "eval.random_init_baseline=false",
         "eval.knn.k=[5]", "trainer.log_every_n_steps=1")


def test_tiny_run_writes_and_lists_its_plots(tmp_path, make_cfg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = run(make_cfg(*SMALL, "+run_dir=run"))
    assert summary["plots"] == ["run/training_curves.png", "run/embedding.png"]  # like "checkpoint": in the run dir
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["plots"] == summary["plots"]
    assert read_png(out / "training_curves.png") == expected_size(plots.CURVES_SIZE)
    assert read_png(out / "embedding.png") == expected_size(plots.EMBEDDING_SIZE)
    assert summary["peak_memory_kind"] == "cpu_peak_rss" and summary["peak_memory_mb"] > 50
    # metrics.csv was complete when the curves were drawn: every step and the last epoch's end rows
    cols = plots._read_columns(out / "metrics.csv")
    steps = summary["steps"]  # 48 training images / 16
    assert steps == 3 and plots._curve(cols, "train/loss_step", 0)[0] == list(range(steps))
    assert plots._curve(cols, "val/probe_top1", 1)[0] == [0] and len(cols["train/loss_epoch"]) == 1


def test_plots_false_writes_none(tmp_path, make_cfg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = run(make_cfg(*SMALL, "+trainer.limit_train_batches=1", "plots=false", "+run_dir=run"))
    assert "plots" not in summary and "linear_probe_top1" in summary
    assert not list((tmp_path / "run").glob("*.png"))
