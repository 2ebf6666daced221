"""Linear-probe benchmark: pre-train several methods on one data set, probe each, tabulate and plot.

    python tools/benchmark.py --methods simclr moco_v2 moco_v3 mae --out benchmark/digits trainer.max_epochs=5
    python tools/benchmark.py --methods simclr:resnet50 mae:vit_small --out benchmark/c10 \\
        data=cifar10 data.path=/data/cifar-10-batches-py trainer.max_epochs=100

Each entry (``METHOD`` or ``METHOD:BACKBONE``) runs as its own process,
``python -m ssl_vision.train method=M [backbone=B] [defaults] OVERRIDES hydra.run.dir=OUT/NAME``
(NAME: ``M``, or ``M_B`` when the backbone is given), so one crash is reported without stopping the
others and each run's peak memory is its own. A run ends with the linear probe and kNN on its frozen
backbone (and, unless ``eval.random_init_baseline=false``, the same probes on the untrained
backbone); the runner reads each run's ``summary.json`` and writes into OUT:

- ``results.json``: one record per entry: ``status`` ("ok" / "failed"), ``run_dir``, ``command``,
  and the run's whole summary (or ``returncode`` and ``error`` for a failed run);
- ``results.md``: method, backbone, epochs, linear top-1/top-5, kNN top-1, train time, peak memory,
  plus random-init rows, the command and the machine;
- ``results.png``: linear and kNN top-1 per method, random-init baselines as horizontal lines.

MAE (ViT only) gets ``backbone=vit_tiny`` unless the command line names a backbone; every other
setting is the run's own config (e.g. conf/data_method/digits_moco_v2.yaml). A previous run in
OUT/NAME is replaced: every run starts fresh. Exits 1 if any run failed, after writing the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: bench.py's device_name
from bench import device_name  # noqa: E402

from ssl_vision.methods import METHODS  # noqa: E402
from ssl_vision.sweep import _fmt  # noqa: E402

COLUMNS = ["method", "backbone", "epochs", "linear top-1", "linear top-5", "kNN top-1", "train time (s)",
           "peak memory (MiB)"]


def parse_entries(entries: list[str]) -> list[tuple[str, str | None]]:
    """``METHOD`` or ``METHOD:BACKBONE`` -> [(method, backbone or None)], in order, without repeats."""
    runs = []
    for entry in entries:
        method, _, backbone = entry.partition(":")
        if method not in METHODS:
            raise SystemExit(f"error: --methods: unknown method '{method}'; choose from {', '.join(METHODS)}")
        if (method, backbone or None) not in runs:
            runs.append((method, backbone or None))
    return runs


def _value(overrides: list[str], key: str):
    """The value the command-line ``overrides`` give ``key`` (the last one wins), or None."""
    found = None
    for o in overrides:
        k, sep, v = o.lstrip("+~").partition("=")
        if sep and k == key:
            found = v
    return found


def run_overrides(method: str, backbone: str | None, overrides: list[str]) -> list[str]:
    """The Hydra overrides of one run: method, backbone, the method's defaults (see the module
    docstring) for keys ``overrides`` leaves unset, then ``overrides``."""
    out = [f"method={method}"]
    if backbone:
        out.append(f"backbone={backbone}")
    elif method == "mae" and _value(overrides, "backbone") is None:
        out.append("backbone=vit_tiny")
    return out + list(overrides)


def _fresh_dir(run_dir: Path) -> None:
    """Remove a previous run in ``run_dir`` (nothing stale may be read: summary.json, metrics.csv rows,
    a last.ckpt that resume=auto would continue); refuse a non-empty folder that is not a run."""
    if not run_dir.exists():
        return
    if any((run_dir / marker).exists() for marker in ("console.log", ".hydra", "summary.json")):
        shutil.rmtree(run_dir)
    elif any(run_dir.iterdir()):
        raise RuntimeError(f"'{run_dir}' is not empty and is not a previous run; remove it or choose another --out")


def _error_line(log_text: str) -> str:
    """The run's one-line ``error: ...`` message, else the last line of its output."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_one(method: str, backbone: str | None, overrides: list[str], out: Path) -> dict:
    """Pre-train + probe one method in its own process; its record for ``results.json``."""
    name = f"{method}_{backbone}" if backbone else method
    run_dir = (out / name).resolve()
    cmd = [sys.executable, "-m", "ssl_vision.train", *run_overrides(method, backbone, overrides),
           f"hydra.run.dir={run_dir}"]
    record = {"method": method, "backbone": backbone, "status": "failed", "run_dir": str(run_dir),
              "command": shlex.join(["python", *cmd[1:]])}
    try:
        _fresh_dir(run_dir)
    except RuntimeError as e:
        return {**record, "returncode": None, "error": f"error: {e}"}
    run_dir.mkdir(parents=True)
    log_path = run_dir / "console.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        return {**record, "returncode": proc.returncode, "error": _error_line(log_path.read_text()),
                "log": str(log_path)}
    return {**record, **json.loads(summary_path.read_text()), "status": "ok"}


def _seconds(v) -> str:
    return "" if v is None else f"{v:.1f}"


def _mib(v) -> str:
    return "" if v is None else f"{v:.0f}"


def _baselines(records: list[dict]) -> dict[str, dict]:
    """{backbone: {"linear": top-1, "knn": top-1}} of the random-init probes found in ``records``."""
    found = {}
    for r in records:
        if r.get("random_init_linear_probe_top1") is not None:
            found.setdefault(r["backbone"], {"linear": r["random_init_linear_probe_top1"],
                                             "knn": r.get("random_init_knn_top1")})
    return found


def markdown(records: list[dict], command: str, machine: str) -> str:
    """``results.md``: the table of the successful runs (random-init rows after them), the command,
    the machine, and one line per failed run."""
    ok = [r for r in records if r["status"] == "ok"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in ok:
        cells = [r["method"], r["backbone"], _fmt(r.get("epochs")), _fmt(r.get("linear_probe_top1")),
                 _fmt(r.get("linear_probe_top5")), _fmt(r.get("knn_top1")), _seconds(r.get("train_seconds")),
                 _mib(r.get("peak_memory_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    for backbone, base in _baselines(ok).items():
        cells = ["random init", backbone, "0", _fmt(base["linear"]), "", _fmt(base["knn"]), "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    data = sorted({str(r.get("data")) for r in ok})
    kinds = sorted({r["peak_memory_kind"] for r in ok if r.get("peak_memory_kind")})
    lines += ["", f"Data: {', '.join(data) or '-'}. kNN top-1: the first `eval.knn.k` (default 20). Random init: "
                  f"the same probes on the untrained backbone. Peak memory: {', '.join(kinds) or '-'}.",
              "", f"Command: `{command}`", "", f"Machine: {machine}"]
    for r in records:
        if r["status"] != "ok":
            lines += ["", f"FAILED: {r['method']} ({r['backbone'] or 'default backbone'}): {r['error']}"]
    return "\n".join(lines) + "\n"


def bar_chart(records: list[dict], out_png) -> Path:
    """``results.png``: grouped bars of linear and kNN top-1 per successful run; each backbone's
    random-init linear / kNN top-1 as horizontal lines across that backbone's groups."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise ValueError("no successful run to plot")
    fig = Figure(figsize=(max(5.0, 1.6 * len(ok) + 2), 4.5), dpi=100)  # Agg canvas, no pyplot state
    ax = fig.subplots()
    xs = range(len(ok))
    width = 0.38
    for offset, key, label, color in ((-width / 2, "linear_probe_top1", "linear top-1", "C0"),
                                      (width / 2, "knn_top1", "kNN top-1", "C1")):
        values = [r.get(key) or 0.0 for r in ok]
        bars = ax.bar([x + offset for x in xs], values, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize="small", padding=2)
    labelled = set()
    for backbone, base in _baselines(ok).items():
        at = [x for x, r in zip(xs, ok) if r["backbone"] == backbone]
        for key, style, name in (("linear", "--", "linear"), ("knn", ":", "kNN")):
            if base[key] is None:
                continue
            label = None if key in labelled else f"random init ({name})"
            labelled.add(key)
            ax.hlines(base[key], min(at) - 0.5, max(at) + 0.5, colors="black", linestyles=style, linewidth=1.5,
                      label=label, zorder=3)
    ax.set_xticks(list(xs), [f"{r['method']}\n{r['backbone']}" for r in ok])
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"frozen-backbone probes on {', '.join(sorted({str(r.get('data')) for r in ok}))}")
    ax.legend(loc="upper center", ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png)
    return Path(out_png)


def write_results(records: list[dict], out: Path, command: str, machine: str) -> None:
    """``results.json``, ``results.md`` and (when a run succeeded) ``results.png`` in ``out``."""
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    (out / "results.md").write_text(markdown(records, command, machine))
    if any(r["status"] == "ok" for r in records):
        bar_chart(records, out / "results.png")


def machine_line() -> str:
    """Host, CPU/GPU model, core count, torch and Python versions."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = f"{device_name(dev)} x{torch.cuda.device_count()}; " if dev.type == "cuda" else ""
    cpu = device_name(torch.device("cpu"))
    return (f"{gpu}{cpu}, {os.cpu_count()} CPU cores; torch {torch.__version__}, Python {platform.python_version()}; "
            f"{platform.node()}, {time.strftime('%Y-%m-%d')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", metavar="METHOD[:BACKBONE]", default=list(METHODS),
                   help="default: %(default)s")
    p.add_argument("--out", required=True, help="output folder: one run folder per method + results.*")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides for every run, e.g. trainer.max_epochs=5 data=cifar10")
    args = p.parse_intermixed_args(argv)
    # --methods takes every word up to the next option: KEY=VALUE words there are overrides
    overrides = [m for m in args.methods if "=" in m] + args.overrides
    entries = parse_entries([m for m in args.methods if "=" not in m])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "tools/benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    machine = machine_line()

    records = []
    for method, backbone in entries:
        start = time.perf_counter()
        r = run_one(method, backbone, overrides, out)
        records.append(r)
        took = f"{time.perf_counter() - start:.0f} s"
        if r["status"] == "ok":
            print(f"{method} ({r['backbone']}): linear top-1 {_fmt(r.get('linear_probe_top1'))}, "
                  f"kNN top-1 {_fmt(r.get('knn_top1'))}, {took}", flush=True)
        else:
            print(f"{method} ({backbone or 'default backbone'}): FAILED (exit {r['returncode']}) after {took}: "
                  f"{r['error']}" + (f"; see {r['log']}" if "log" in r else ""), flush=True)
        write_results(records, out, command, machine)  # after every run: partial results survive
    print((out / "results.md").read_text())
    failed = [r["method"] for r in records if r["status"] != "ok"]
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f", {out / 'results.png'}" if len(failed) < len(records) else ""))
    if failed:
        print(f"error: {len(failed)} of {len(records)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
