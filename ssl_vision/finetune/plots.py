"""``finetune_curves.png``: the fine-tuning curves of one or several fine-tunes, from their metrics.csv.

Built like ``ssl_vision.plots.plot_training_curves`` (its CSV reader, figure size and Agg canvas), with
the panels a fine-tune has: training loss per step (and epoch means), validation top-1 (solid) and top-5
(dashed) per epoch, learning rate per step (the largest group's: the head's under layer decay).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..plots import CURVES_SIZE, DPI, _curve, _empty, _read_columns


def plot_finetune_curves(runs: list[tuple[str, Path]], out_png) -> Path:
    """Three panels over ``runs`` ((label, metrics.csv) pairs, one colour each); writes ``out_png``."""
    fig = Figure(figsize=CURVES_SIZE, dpi=DPI)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for ax, title, xlabel in ((ax_loss, "training loss", "step"), (ax_acc, "validation accuracy", "epoch"),
                              (ax_lr, "learning rate", "step")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = {ax_loss: 0, ax_acc: 0, ax_lr: 0}
    several = len(runs) > 1
    for i, (label, csv_path) in enumerate(runs):
        cols = _read_columns(csv_path)
        color = f"C{i % 10}"
        for ax, key, x, style, name in (
                (ax_loss, "train/loss_step", 0, "-", "per step"), (ax_loss, "train/loss_epoch", 0, "o-", "epoch mean"),
                (ax_acc, "val/top1", 1, "o-", "top-1"), (ax_acc, "val/top5", 1, "s--", "top-5"),
                (ax_lr, "train/lr", 0, "-", None)):
            xs, ys = _curve(cols, key, x)
            if not xs:
                continue
            text = f"{label} {name}" if several and name else (label if several else name)
            ax.plot(xs, ys, style, color=color, label=text, markersize=3, alpha=0.8 if x == 0 else 1.0)
            drawn[ax] += 1
    for ax, count in drawn.items():
        if not count:
            _empty(ax, "not logged in this run")
        elif ax is not ax_lr or several:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    return Path(out_png)
