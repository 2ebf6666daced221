"""The GPU lane: one command that proves the GPU path works and measures it, in one JSON + one Markdown table.

    python tools/gpu_check.py                            # on a CUDA machine: about 4 minutes on one H100 / H200
    python tools/gpu_check.py --device cpu --tiny        # the CPU lane (CI, tests/test_gpu_check.py): tiny sizes
    python tools/gpu_check.py --sections end_to_end probes --out part.json    # some sections only (a rerun)

On a bare GPU machine (Python 3.12 with torch, Lightning, timm, torchvision, torchmetrics, TensorBoard; no
Kornia, Hydra or OmegaConf; no network) it runs from the source tree, without ``pip install .``, with the
missing packages carried as wheels. Once, on a machine with network, in the repository root:

    bash tools/fetch_gpu_wheels.sh          # kornia, kornia-rs, hydra-core, omegaconf, antlr4 runtime -> .whl/

then on the GPU machine, in the repository root (the device tool: ``carry: [".whl"]``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\
        PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --out $OUT/gpu_check.json

(PyYAML, packaging, numpy, Pillow, scikit-learn and matplotlib, which ssl_vision also imports, are there.)

Sections, in this order, each in a worker process (a crash, a hang past its hard limit or a poisoned CUDA context
loses that section only: it is recorded with its error line and the others still run, in a new worker); the JSON
and the Markdown are rewritten after every section, so a command stopped part-way leaves a partial record. Each
section has a time budget, and the whole run ``--time-limit`` (300 s on a GPU): what would start after them is
skipped (and recorded so), and the probes size themselves to the time left.

- ``environment``: versions, devices, CPU cores, where kornia / hydra were imported from.
- ``gather``: the DDP equivalence step of every method (``tools/gather_check.py``): one process on the device
  against one process on the CPU; with 2+ GPUs, 2 NCCL ranks with SyncBatchNorm against one process on the GPU;
  on the CPU lane, 2 gloo ranks against one process.
- ``step_floor``: ``tools/bench.py``'s measure (``bench_one``) for SimCLR ResNet-50 and MAE ViT-B/16 at batch
  256 in bf16-mixed; for MAE also the Trainer step with the online probe every N steps (``--probe-every``,
  ``probe.every_n_steps=N``, the online kNN off), the mean over whole periods of N steps.
- ``end_to_end``: images/s of SimCLR (ResNet-18, ResNet-50; 224 px, batch 256, bf16-mixed) fed by this suite's
  data path (JPEG decode in workers -> uint8 canvas -> device augmentation) against the same model fed by the
  peers' pipeline (torchvision transforms in DataLoader workers, ``tools/peer_pipeline.py``), same images,
  every CPU core a worker for both, the same Trainer.
- ``methods``: every method of ``ssl_vision.methods.METHODS`` (ResNet-50 for the methods that take a ResNet,
  ViT-B/16 for the ViT-only ones) for a few steps at 224 px on synthetic JPEGs (``data=imagenet`` layout)
  through the real console entry point (``ssl_vision.train.main``, in-process) in ``32-true`` and
  ``bf16-mixed``: finite losses (``metrics.csv``), no error, channels-last ResNets on GPUs; then one method with
  ``backbone.compile=true`` (the graphs dynamo captured are counted; the CPU lane compiles with ``aot_eager``).
- ``probes``: the offline linear probe (one epoch, the ``eval=default`` protocol) and the kNN on
  ImageNet-sized synthetic features (1,281,167 x 2048, 1000 classes, 50,000 queries): seconds and peak memory,
  through ``ssl_vision.evaluation`` (on the device once its probes run there; on CPU tensors otherwise, timed on
  as many rows as the time left allows and extrapolated, which the record says).

The Markdown table compares against the GPU targets (images/s >= 2x the torchvision-worker pipeline for
ResNet-18; SimCLR step / floor <= 1.10; MAE step / (encoder + decoder) <= 1.15 with the probe amortized) with a
pass / miss column and by how much. Exit status: 0 when every section succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
# in this order: the quick correctness check first, then the figures of the targets, then the long per-method sweep,
# then the probes (sized to the time left)
SECTIONS = ("environment", "gather", "step_floor", "end_to_end", "methods", "probes")
# seconds each section may take on a GPU: a soft budget (a section skips or shrinks its remaining items to keep
# to it, and to the whole run's --time-limit) and a hard limit of 1.5 x budget + 30 s, after which its worker is
# killed. A normal run on one H100 / H200 takes about 4 minutes.
BUDGETS = {"environment": 30, "gather": 40, "step_floor": 50, "end_to_end": 75, "methods": 130, "probes": 45}
TINY_BUDGET = 240  # every section of the CPU lane (a guard only: its sizes are fixed)
TARGETS = {  # key: (what, comparison, GPU target)
    "end_to_end_resnet18": ("images/s, suite / torchvision workers, SimCLR ResNet-18", ">=", 2.0),
    "simclr_step_over_floor": ("SimCLR ResNet-50 step / floor", "<=", 1.10),
    "mae_step_over_network_amortized": ("MAE ViT-B/16 step / (encoder + decoder), probe amortized", "<=", 1.15),
}


# ======================================================================================================
# the parent: runs the sections in worker processes and writes the record (no torch import here)
# ======================================================================================================


def budget_of(section: str, args) -> float:
    return (TINY_BUDGET if args.tiny else BUDGETS[section]) * args.budget_scale


def hard_limit(section: str, args) -> float:
    return 1.5 * budget_of(section, args) + 30


def write_record(record: dict, out: Path, md: Path) -> None:
    for path, text in ((out, json.dumps(record, indent=2, default=str) + "\n"), (md, markdown(record))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def last_line(path: Path) -> str:
    """The last meaningful line of a worker's log (its error, usually)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    errors = [ln for ln in lines if ln.startswith(("error:", "Error", "RuntimeError", "torch.", "Traceback"))
              or "Error:" in ln]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_sections(args, record: dict, out: Path, md: Path, workdir: Path, log_path: Path) -> None:
    """Start a worker for the sections still to run; whenever one finishes, store its result and rewrite the
    record; a worker that dies or overruns a section's hard limit is killed, that section is recorded as
    failed, and a new worker takes the rest."""
    remaining = [s for s in args.sections]
    progress = workdir / "progress.jsonl"
    while remaining:
        progress.write_text("")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--progress", str(progress),
               "--workdir", str(workdir), "--device", args.device, "--probe-every", str(args.probe_every),
               "--budget-scale", str(args.budget_scale), "--stop-at", str(args.stop_at), "--sections", *remaining]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--compile-backend", args.compile_backend] if args.compile_backend else []
        cmd += ["--crash-in", args.crash_in] if args.crash_in and args.crash_in in remaining else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        if args.tiny:
            env.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core CI machine: no waiting for a second thread
        with open(log_path, "a") as log:
            log.write(f"\n=== worker: {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        current, started, seen = None, None, 0
        failure, fatal = None, False
        while True:
            code = proc.poll()
            lines = progress.read_text().splitlines()
            for line in lines[seen:]:
                if not line.endswith("}"):
                    break  # written part-way
                seen += 1
                event = json.loads(line)
                if event["event"] == "start":
                    current, started = event["section"], time.monotonic()
                    print(f"[gpu_check] {current} ...", flush=True)
                elif event["event"] == "done":
                    name, result = event["section"], event["result"]
                    record["sections"][name] = result
                    remaining.remove(name)
                    current = None
                    write_record(finish(record), out, md)
                    print(f"[gpu_check] {name}: {result['status']} in {result.get('seconds', 0):.0f} s"
                          + (f" - {result['error']}" if result.get("error") else ""), flush=True)
                elif event["event"] == "fatal":
                    failure, fatal = event["error"], True
            if code is not None:
                if current is not None or (remaining and failure):
                    failure = failure or f"worker exited with code {code}: {last_line(log_path)}"
                break
            if current is not None and time.monotonic() - started > hard_limit(current, args):
                failure = f"timed out after {hard_limit(current, args):.0f} s (budget {budget_of(current, args):.0f} s)"
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        if failure is None and code == 3:
            continue  # the worker stopped after a failed section (fresh CUDA state for the rest); go on
        if failure is None:
            if not remaining:
                break
            failure = f"worker exited with code {code} before running it: {last_line(log_path)}"
        name = current or remaining[0]
        record["sections"][name] = {"status": "failed", "error": failure}
        print(f"[gpu_check] {name}: failed - {failure}", flush=True)
        remaining.remove(name)
        if fatal:  # the worker could not set up (no CUDA device, ...): the same for every section
            for other in list(remaining):
                record["sections"][other] = {"status": "failed", "error": failure}
                remaining.remove(other)
        write_record(finish(record), out, md)


def finish(record: dict) -> dict:
    """The record with its summary fields (status, targets) brought up to date."""
    sections = record["sections"]
    record["device"] = next((r["device"] for r in sections.values() if r.get("device")), record.get("device"))
    record["status"] = "ok" if all(sections.get(s, {}).get("status") == "ok" for s in record["planned"]) else "failed"
    record["targets"] = targets(record)
    return record


# --- targets and the Markdown table ----------------------------------------------------------------------------


def verdict(value, op: str, target: float) -> str:
    if value is None:
        return "no figure"
    ok = value >= target if op == ">=" else value <= target
    gap = abs(value - target)
    return "pass" if ok else f"MISS by {gap:.3g} ({100 * gap / target:.0f}%)"


def targets(record: dict) -> list[dict]:
    """Each GPU target with the figure measured for it, and pass / miss (``applies``: measured on a GPU)."""
    s = record["sections"]
    e2e = {r.get("backbone"): r for r in s.get("end_to_end", {}).get("runs", [])}
    floor = {r.get("method"): r for r in s.get("step_floor", {}).get("runs", [])}
    values = {
        "end_to_end_resnet18": e2e.get("resnet18", {}).get("speedup"),
        "simclr_step_over_floor": floor.get("simclr", {}).get("step_over_floor"),
        "mae_step_over_network_amortized": floor.get("mae", {}).get("amortized_step_over_network"),
    }
    on_gpu = record.get("device") == "cuda" and not record.get("tiny")
    out = []
    for key, (what, op, target) in TARGETS.items():
        value = values[key]
        out.append({"key": key, "what": what, "target": f"{op} {target}", "value": value, "applies": on_gpu,
                    "verdict": verdict(value, op, target) if on_gpu else "n/a (not a GPU run)"})
    return out


def _f(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def status_of(r: dict) -> str:
    """The verdict cell of a section or a run that has a status."""
    status = r.get("status")
    if status == "ok":
        return "ok"
    return f"{status.upper() if status in ('skipped', 'partial') else 'FAILED'}: {r.get('error') or status}"


def _environment_rows(r, tv):
    yield "machine", r.get("summary", ""), "", status_of(r)


def _gather_rows(r, tv):
    for c in r.get("checks", []):
        if c.get("skipped"):
            yield c["what"], c["skipped"], "", "skipped"
            continue
        result = "identical" if not c["max_abs_difference"] else (
            f"max abs diff {c['max_abs_difference']:.2g}, worst {c['worst_tolerance_ratio']:.2g} of the tolerance "
            f"({c['worst_method']}: {c['worst_entry']})")
        yield c["what"], result, f"rtol {c['rtol']}, atol {c['atol']}", "pass" if c["ok"] else "FAILED"


def _step_floor_rows(r, tv):
    for run in r.get("runs", []):
        head = f"{run.get('method')} {run.get('backbone')}"
        if run.get("status") != "ok":
            yield head, "-", "", status_of(run)
            continue
        head += f" b{run['batch_size']} {run['precision']}"
        if run["method"] == "mae":
            yield (head + ", probe every step", f"step {run['step_ms']:.1f} / enc+dec {run['network_ms']:.1f} ms = "
                   f"{run['step_over_network']:.3f}; floor {run['floor_ms']:.1f} ms", "(info)", "")
            t = tv["mae_step_over_network_amortized"]
            yield (head + f", probe every {run['probe_every']} steps",
                   f"mean step {run['amortized_step_ms']:.1f} / enc+dec {run['amortized_network_ms']:.1f} ms = "
                   f"{run['amortized_step_over_network']:.3f} (probe.every_n_steps={run['probe_every']})",
                   t["target"], t["verdict"])
        else:
            t = tv["simclr_step_over_floor"] if run["method"] == "simclr" else {"target": "", "verdict": ""}
            yield (head, f"step {run['step_ms']:.1f} / floor {run['floor_ms']:.1f} ms = {run['step_over_floor']:.3f}",
                   t["target"], t["verdict"])


def _end_to_end_rows(r, tv):
    for run in r.get("runs", []):
        if run.get("status") != "ok":
            yield f"SimCLR {run.get('backbone')}", "-", "", status_of(run)
            continue
        t = tv["end_to_end_resnet18"] if run["backbone"] == "resnet18" else {"target": "(info)", "verdict": ""}
        yield (f"SimCLR {run['backbone']} b{run['batch_size']} {run['precision']}, {run['workers']} workers",
               f"suite {run['suite']['images_per_second']:.0f} img/s vs torchvision workers "
               f"{run['torchvision_workers']['images_per_second']:.0f} img/s = {run['speedup']:.2f}x",
               t["target"], t["verdict"])


def _methods_rows(r, tv):
    for run in r.get("runs", []):
        check = f"{run['method']} {run['backbone']} {run['precision']}"
        check += ", backbone.compile" if run.get("compile") else ""
        if run.get("status") == "skipped":
            yield check, "-", "finite, no error", status_of(run)
            continue
        losses = run.get("losses") or []
        result = (f"{len(losses)} steps, loss {_f(losses[0] if losses else None)} -> "
                  f"{_f(losses[-1] if losses else None)}, {run.get('seconds', 0):.0f} s"
                  + (", channels_last" if run.get("channels_last") else "")
                  + (f", compiled ({run['compile_backend']}, {run.get('compiled_graphs')} graphs)"
                     if run.get("compile_backend") else ""))
        yield check, result, "finite, no error", "pass" if run.get("status") == "ok" else status_of(run)


def _probes_rows(r, tv):
    for key in ("linear", "knn"):
        p = r.get(key)
        if p:
            how = f"measured on {p['rows_timed']:,} rows, extrapolated" if p.get("extrapolated") else "measured"
            yield (p["what"], f"{p['seconds']:.1f} s ({how}), peak {p['peak_memory_mb']:.0f} MiB ({p['memory_kind']}), "
                   f"top-1 {_f(p.get('top1'))}, on {p['device']}", "(info)", "ok")
    if r.get("note"):
        yield "note", r["note"], "", ""


ROWS = {"environment": _environment_rows, "gather": _gather_rows, "step_floor": _step_floor_rows,
        "end_to_end": _end_to_end_rows, "methods": _methods_rows, "probes": _probes_rows}


def markdown(record: dict) -> str:
    """The record as one table: section, check, result, target, verdict (a section's own line when it did not
    succeed)."""
    tv = {t["key"]: t for t in record.get("targets") or targets(record)}
    rows = []
    for name in record["planned"]:
        r = record["sections"].get(name)
        if r is None:
            rows.append([name, "-", "not run (the command stopped first)", "", "MISSING"])
            continue
        rows += [[name, *cells] for cells in ROWS[name](r, tv)]
        if r.get("status") != "ok" and name != "environment":
            rows.append([name, "section", "-", "", status_of(r)])
    env = record["sections"].get("environment", {})
    lane = "" if record.get("device") == "cuda" and not record.get("tiny") else \
        " CPU lane (tiny sizes): the GPU targets do not apply."
    head = [f"# ssl-vision GPU check: {record.get('status', 'running')}", "",
            f"{env.get('summary', '')}; {record.get('started', '')}; `{record.get('command', '')}`.{lane}", "",
            "| section | check | result | target | verdict |", "|---|---|---|---|---|"]
    return "\n".join(head + ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU lane); else the GPU sizes")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", default="gpu_check.json", help="the JSON record (default: %(default)s, in the working "
                                                           "directory); the Markdown table goes next to it (.md)")
    p.add_argument("--workdir", help="synthetic JPEGs and run folders (default: a new temporary folder, removed at "
                                     "the end)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--probe-every", type=int, default=10, help="MAE: the online probe's period for the amortized "
                                                               "step (default %(default)s)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument("--time-limit", type=float, help="seconds for the whole run: a section that starts late skips or "
                                                    "shrinks what does not fit (default: 300 on a GPU, none with "
                                                    "--tiny; 0: none)")
    p.add_argument("--compile-backend", help="torch.compile backend of the compile run (default: inductor on "
                                             "GPUs, aot_eager on the CPU)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--crash-in", choices=SECTIONS, help=argparse.SUPPRESS)  # tests: the worker dies in that section
    p.add_argument("--progress", help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=float, default=0.0, help=argparse.SUPPRESS)  # time.time() of --time-limit
    args = p.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(TOOLS))
        from gpu_check_sections import worker

        return worker(args)

    out = Path(args.out).resolve()
    md = out.with_suffix(".md")
    out.with_suffix(".log").write_text("")  # the workers' output
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:  # not next to --out: on the device tool that is $OUT, which returns a few files only
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix="ssl_vision_gpu_check_"))
    args.sections = [s for s in SECTIONS if s in args.sections]  # always in the documented order
    record = {"tool": "tools/gpu_check.py", "command": shlex.join(["python", "tools/gpu_check.py",
                                                                   *(argv if argv is not None else sys.argv[1:])]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": bool(args.tiny), "planned": args.sections,
              "budgets_seconds": {s: budget_of(s, args) for s in args.sections}, "workdir": str(workdir),
              "sections": {}}
    start = time.monotonic()
    limit = args.time_limit if args.time_limit is not None else (0 if args.tiny else 300)
    args.stop_at = time.time() + limit if limit else 0.0
    record["time_limit_seconds"] = limit or None
    write_record(finish(record), out, md)
    try:
        run_sections(args, record, out, md, workdir, out.with_suffix(".log"))
    finally:
        record["seconds"] = round(time.monotonic() - start, 1)
        write_record(finish(record), out, md)
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print(md.read_text())
    print(f"wrote {out}, {md} and {out.with_suffix('.log')} (the workers' output)")
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
