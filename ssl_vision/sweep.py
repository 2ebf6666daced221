"""Hydra callback that gathers a sweep's ``summary.json`` files into one table (CSV + markdown)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback

COLUMNS = ["job", "overrides", "method", "backbone", "data", "epochs", "steps", "train_seconds",
           "train_images_per_second", "online_probe_top1", "linear_probe_top1", "linear_probe_top5",
           "knn_top1", "random_init_linear_probe_top1"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "" if value is None else str(value)


def write_sweep_table(sweep_dir: Path) -> list[dict]:
    """Collect ``<sweep_dir>/*/summary.json`` into ``sweep_summary.csv`` and ``sweep_summary.md``."""
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json")):
        row = json.loads(path.read_text())
        row["job"] = path.parent.name
        rows.append(row)
    if not rows:
        return rows
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c)) for c in COLUMNS})
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    (sweep_dir / "sweep_summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_sweep_table(sweep_dir)
        if rows:
            print(f"sweep table: {sweep_dir / 'sweep_summary.md'} ({len(rows)} runs)")
