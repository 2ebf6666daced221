"""The sections of ``tools/gpu_check.py``, run in its worker processes (``gpu_check.py --worker``).

Each section is a function of a ``Context`` (device, this lane's sizes, the section's time budget, the working
folder) that returns its part of the record: ``status`` ("ok" / "failed"), ``error`` (one line) when it failed,
and its figures. The worker runs the sections it is given in order and reports each one's start and result as
a JSON line in the progress file, which the parent reads (see ``gpu_check.run_sections``); after a failed
section on a GPU it stops, so the rest run in a fresh process with a fresh CUDA context.

ssl_vision, Lightning and Hydra are imported by the sections that use them, so that a package missing on a bare
machine fails those sections with its name (and the hint to carry the wheels) rather than the worker.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from gpu_check import REPO, budget_of


def with_status(out: dict, names: list[str], runs: list[dict]) -> dict:
    """``out`` with the section's status from its ``runs``: "ok"; "failed" (some failed: named in ``error``); or
    "partial" (none failed, some were skipped for lack of time)."""
    failed = [n for n, r in zip(names, runs) if r["status"] == "failed"]
    skipped = [n for n, r in zip(names, runs) if r["status"] == "skipped"]
    out["status"] = "failed" if failed else "partial" if skipped else "ok"
    parts = ([f"failed: {', '.join(failed)}"] if failed else []) + \
        ([f"skipped (no time left): {', '.join(skipped)}"] if skipped else [])
    if parts:
        out["error"] = "; ".join(parts)
    return out


def one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 300 else text[:297] + "..."


class Context:
    """What a section needs: the device, the sizes of this lane, its time budget, the working folder."""

    def __init__(self, args, device, workdir: Path):

        self.args, self.device, self.workdir = args, device, workdir
        self.cuda = device.type == "cuda"
        self.tiny = bool(args.tiny)
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.gpus = torch.cuda.device_count() if self.cuda else 0
        self.plan = tiny_plan(self.cores) if self.tiny else gpu_plan(self.cores)
        self.deadline = None
        self._tree = None

    def start(self, section: str) -> None:
        self.deadline = time.monotonic() + budget_of(section, self.args)

    def left(self) -> float:
        """Seconds left of the section's budget, or of the whole run's time limit if that ends first."""
        left = self.deadline - time.monotonic()
        return min(left, self.args.stop_at - time.time()) if self.args.stop_at else left

    def jpeg_tree(self) -> Path:
        if self._tree is None:
            self._tree = make_jpeg_tree(self.workdir / "jpegs", **self.plan["jpegs"])
        return self._tree


def gpu_plan(cores: int) -> dict:
    workers = max(1, cores)
    batch = 256
    warmup, timed = max(2, workers), max(4, 2 * workers)  # whole waves of the workers' batches (see end_to_end)
    return {
        "jpegs": dict(unique=1024, sizes=[(500, 375), (375, 500), (500, 333), (500, 500)], classes=8,
                      train=(warmup + timed + 2) * batch, val_per_class=4),
        "methods": dict(image_size=224, canvas=512, batch=32, steps=3, workers=min(4, workers), resnet="resnet50",
                        vit="vit_base", extra=[], dim_cap=None, precisions=[["32-true", "bf16-mixed"]],
                        compile=("simclr", "resnet18", "bf16-mixed")),
        "step_floor": dict(runs=[("simclr", "resnet50", 256, []), ("mae", "vit_base", 256, [])], image_size=224,
                           warmup=3, repeats=10, precision="bf16-mixed", workers=min(8, workers)),
        "end_to_end": dict(backbones=["resnet18", "resnet50"], image_size=224, canvas=512, batch=batch,
                           workers=workers, warmup=warmup, timed=timed, precision="bf16-mixed"),
        "probes": dict(rows=1_281_167, dim=2048, classes=1000, queries=50_000, pilot_rows=131_072, pilot_queries=1024),
        "gather": dict(batch=16, image_size=32, dim_cap=512),
    }


def tiny_plan(cores: int) -> dict:
    workers = max(1, min(2, cores))
    batch, warmup, timed = 8, 2 * workers, 2 * workers
    vit = ["backbone.patch_size=4", "+backbone.kwargs.depth=2"]
    return {
        "jpegs": dict(unique=16, sizes=[(64, 48), (48, 64)], classes=4, train=(warmup + timed + 2) * batch,
                      val_per_class=2),
        "methods": dict(image_size=32, canvas=48, batch=batch, steps=2, workers=0, resnet="resnet18_tiny",
                        vit="vit_tiny", extra=vit, dim_cap=64, precisions=[["32-true"], ["bf16-mixed"]],
                        compile=("simclr", "resnet18_tiny", "32-true")),
        "step_floor": dict(runs=[("simclr", "resnet18_tiny", batch, []), ("mae", "vit_tiny", batch, vit)],
                           image_size=32, warmup=1, repeats=2, precision="32-true", workers=0, dim_cap=64),
        "end_to_end": dict(backbones=["resnet18_tiny"], image_size=32, canvas=48, batch=batch, workers=workers,
                           warmup=warmup, timed=timed, precision="32-true"),
        "probes": dict(rows=4096, dim=64, classes=10, queries=512, pilot_rows=1024, pilot_queries=128),
        "gather": dict(batch=8, image_size=16, dim_cap=32),
    }


# --- synthetic JPEGs --------------------------------------------------------------------------------------------


def _make_chunk(task) -> None:
    """Photo-like JPEGs of one size: a smooth random colour field plus colour noise blurred at 0.9 px, quality 90:
    about 115 KB at 500 x 375, as ImageNet's training JPEGs average (ILSVRC-2012: ~138 GB in 1.28 M files, typical
    photos of ~500 x 375), so decoding costs what it costs there (``bench_loader.make_jpegs``' smoother images
    are 45 KB at that size and decode in half the time)."""
    import numpy as np
    from PIL import Image, ImageFilter

    folder, n, (w, h), seed = task
    Path(folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(0.9))
        arr = np.asarray(field, dtype=np.int16) + (np.asarray(noise, dtype=np.int16) - 128) * 1.6
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(Path(folder) / f"img_{i:05d}.jpg", quality=90)


def make_jpeg_tree(root: Path, unique: int, sizes, classes: int, train: int, val_per_class: int) -> Path:
    """An ImageNet-style tree ``root/{train,val}/c<k>/*.jpg`` of photo-like JPEGs (``_make_chunk``):
    ``unique`` distinct images in the given sizes, made in parallel, hard-linked (copied where links fail) into
    ``train`` training entries spread over ``classes`` folders and ``val_per_class`` validation entries each.
    Kept for later sections and workers (a ``.complete`` marker with the spec)."""
    import multiprocessing

    spec = {"unique": unique, "sizes": [list(s) for s in sizes], "classes": classes, "train": train,
            "val_per_class": val_per_class}
    marker = root / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root

    shutil.rmtree(root, ignore_errors=True)
    chunks = max(len(sizes), min(32, unique // 8 or 1))
    tasks = [(str(root / "unique" / f"chunk{i:02d}"), len(range(i, unique, chunks)), sizes[i % len(sizes)], i)
             for i in range(chunks) if len(range(i, unique, chunks))]
    with multiprocessing.get_context("fork").Pool(min(len(tasks), len(os.sched_getaffinity(0)))) as pool:
        pool.map(_make_chunk, tasks)
    files = sorted((root / "unique").rglob("*.jpg"))
    entries = [("train", i) for i in range(train)] + [("val", i) for i in range(val_per_class * classes)]
    for split, i in entries:
        folder = root / split / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        src, dst = files[i % len(files)], folder / f"img_{i:06d}.jpg"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    marker.write_text(json.dumps(spec))
    return root


def jpeg_summary(root: Path) -> dict:
    files = sorted((root / "unique").rglob("*.jpg"))
    from PIL import Image

    sizes = sorted({Image.open(f).size for f in files})
    return {"unique_files": len(files), "train_entries": sum(1 for _ in (root / "train").rglob("*.jpg")),
            "pixel_sizes_wh": [list(s) for s in sizes],
            "mean_file_kib": round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1)}


# --- section: environment -----------------------------------------------------------------------------------


def section_environment(ctx) -> dict:

    versions, origins = {"python": platform.python_version()}, {}
    for name in ("torch", "torchvision", "lightning", "timm", "torchmetrics", "kornia", "hydra", "omegaconf", "numpy",
                 "PIL"):
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", "?")
        origins[name] = str(Path(module.__file__).parent)
    import ssl_vision.methods as methods  # the suite itself imports (kornia, hydra, omegaconf, timm, lightning)

    origins["ssl_vision"] = str(Path(importlib.import_module("ssl_vision").__file__).parent)

    gpus = [torch.cuda.get_device_name(i) for i in range(ctx.gpus)]
    out = {"status": "ok", "versions": versions, "origins": origins, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if ctx.cuda else None, "gpus": gpus, "cpu_cores": ctx.cores,
           "device": ctx.device.type, "methods": list(methods.METHODS), "host": platform.node(),
           "git_commit": git_commit()}
    from bench import device_name

    what = f"{len(gpus)} x {gpus[0]}" if gpus else device_name(ctx.device)
    out["summary"] = (f"{what}, {ctx.cores} CPU cores; torch {versions['torch']}"
                      + (f" (CUDA {torch.version.cuda})" if ctx.cuda else "")
                      + f", Lightning {versions['lightning']}, timm {versions['timm']}, kornia {versions['kornia']}, "
                        f"Python {versions['python']}")
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (r.stdout.strip() + ("+changes" if dirty else "")) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# --- section: methods (the real console entry point, in-process) -------------------------------------------------


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def read_losses(metrics_csv: Path) -> list[float]:
    """The per-step training losses of a run's ``metrics.csv`` (``train/loss_step``; ``train/loss`` if absent)."""
    import csv

    if not metrics_csv.is_file():
        return []
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    key = next((k for k in ("train/loss_step", "train/loss") if rows and k in rows[0]), None)
    return [float(r[key]) for r in rows if key and r.get(key) not in (None, "")]


def method_overrides(method: str, data: str, plan: dict, image_size: int, batch: int) -> list[str]:
    """Tiny lane: heads capped (``gather_check.capped_overrides``), views fitted to the image size, MoCo's queue
    sized to the batch, read from the config the run composes (``data``: its data option, which may tune the
    method: ``conf/data_method``). GPU: nothing (every method's own defaults)."""
    if not plan.get("dim_cap"):
        return []
    from gather_check import capped_overrides, local_view_overrides
    from hydra import compose, initialize_config_dir

    from ssl_vision.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="train",
                      overrides=[f"method={method}", f"data={data}", f"data.image_size={image_size}"])
    out = capped_overrides(cfg.method, plan["dim_cap"], 1) + local_view_overrides(cfg.augment, image_size)
    if "queue_size" in cfg.method:
        out.append(f"method.queue_size={4 * batch}")
    return out


def jpeg_data(ctx, p: dict) -> list[str]:
    """The data overrides of a run on the synthetic JPEG tree: ``data=imagenet`` (its canvas, workers, ...) at the
    sizes of plan ``p``."""
    return ["data=imagenet", f"data.path={ctx.jpeg_tree()}", f"data.image_size={p['image_size']}",
            f"data.canvas_size={p['canvas']}", f"data.batch_size={p['batch']}", f"data.num_workers={p['workers']}"]


def cli_run(ctx, tag: str, method: str, backbone: str, precision: str, extra=()) -> dict:
    """``ssl-vision-train`` with the check's overrides, in this process (``ssl_vision.train.main``, as the console
    script calls it); its record: exit, per-step losses, channels-last, seconds, peak GPU memory."""
    from omegaconf import OmegaConf

    import ssl_vision.train as train

    p = ctx.plan["methods"]
    run_dir = ctx.workdir / "runs" / tag

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"method={method}", f"backbone={backbone}", *jpeg_data(ctx, p), f"trainer.max_steps={p['steps']}",
                 f"trainer.precision={precision}", f"trainer.accelerator={'gpu' if ctx.cuda else 'cpu'}",
                 "trainer.devices=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                 "eval.enabled=false", "plots=false", "resume=null"]
    if backbone.startswith("vit"):
        overrides += p["extra"]
    overrides += method_overrides(method, "imagenet", p, p["image_size"], p["batch"]) + list(extra)
    overrides.append(f"hydra.run.dir={run_dir}")
    record = {"method": method, "backbone": backbone, "precision": precision, "command": shlex.join(
        ["python", "-m", "ssl_vision.train", *overrides])}
    captured = io.StringIO()
    saved_argv = sys.argv
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    error = None
    try:
        sys.argv = ["ssl-vision-train", *overrides]
        with contextlib.redirect_stderr(_Tee(sys.stderr, captured)):
            train.main()
    except SystemExit as e:
        if e.code not in (0, None):
            lines = [ln for ln in captured.getvalue().splitlines() if ln.startswith("error:")]
            error = lines[-1] if lines else f"exit code {e.code}"
    except Exception as e:  # noqa: BLE001 - recorded; the next run goes on
        error = one_line(e)
    finally:
        sys.argv = saved_argv
    record["seconds"] = round(time.perf_counter() - start, 2)
    losses = read_losses(run_dir / "metrics.csv")
    record["losses"] = losses
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        record.update(steps=s.get("steps"), peak_memory_mb=s.get("peak_memory_mb"),
                      train_images_per_second=s.get("train_images_per_second"))
    config = run_dir / "config.yaml"
    if config.is_file():
        record["channels_last"] = bool(OmegaConf.load(config).backbone.get("channels_last", False))
    problems = [error] if error else []
    if not error:

        if record.get("steps") != p["steps"]:
            problems.append(f"{record.get('steps')} steps done, {p['steps']} asked")
        if len(losses) != p["steps"] or not all(math.isfinite(v) for v in losses):
            problems.append(f"losses {losses}: expected {p['steps']} finite values")
        if ctx.cuda and not backbone.startswith("vit") and not record.get("channels_last"):
            problems.append("a ResNet on a GPU should train channels-last (backbone.channels_last: null)")
    record["status"] = "failed" if problems else "ok"
    if problems:
        record["error"] = "; ".join(problems)
    if not ctx.args.keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # hundreds of MB per ResNet-50 run
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return record


class compile_backend:
    """``nn.Module.compile`` with another torch.compile backend (the CPU lane's light ``aot_eager``)."""

    def __init__(self, backend: str | None):
        self.backend = backend

    def __enter__(self):

        self.original = torch.nn.Module.compile
        if self.backend:
            original, backend = self.original, self.backend

            def compile_with_backend(module, *args, **kwargs):
                kwargs.setdefault("backend", backend)
                return original(module, *args, **kwargs)

            torch.nn.Module.compile = compile_with_backend

    def __exit__(self, *exc):

        torch.nn.Module.compile = self.original


def section_methods(ctx) -> dict:
    from gather_check import backbone_for
    from ssl_vision.methods import METHODS

    p = ctx.plan["methods"]
    plan = []
    for i, (name, cls) in enumerate(METHODS.items()):
        backbone = backbone_for(cls, p["vit"], p["resnet"])
        for precision in p["precisions"][i % len(p["precisions"])]:  # tiny lane: precisions alternate
            plan.append((f"{name}_{precision}", name, backbone, precision, ()))
    method, backbone, precision = p["compile"]
    plan.append((f"{method}_compile", method, backbone, precision, ("backbone.compile=true",)))
    runs = []
    for tag, name, backbone, precision, extra in plan:
        if ctx.left() < 0:
            runs.append({"method": name, "backbone": backbone, "precision": precision, "compile": bool(extra),
                         "status": "skipped", "error": "no time left (the section budget or --time-limit)"})
            continue
        if extra:
            import torch._dynamo
            from torch._dynamo.utils import counters

            backend = ctx.args.compile_backend or ("inductor" if ctx.cuda else "aot_eager")
            before = counters["stats"]["unique_graphs"]
            with compile_backend(None if backend == "inductor" else backend):
                run = cli_run(ctx, tag, name, backbone, precision, extra)
            run.update(compile_backend=backend, compiled_graphs=counters["stats"]["unique_graphs"] - before)
            if run["status"] == "ok" and not run["compiled_graphs"]:
                run.update(status="failed", error="backbone.compile=true compiled nothing")
            torch._dynamo.reset()
        else:
            run = cli_run(ctx, tag, name, backbone, precision)
        run["compile"] = bool(extra)
        print(f"  {tag} {backbone}: {run['status']} {run['seconds']:.1f} s {run.get('error', '')}", flush=True)
        runs.append(run)
    out = {"runs": runs, "methods": list(METHODS)}
    return with_status(out, [f"{r['method']} {r['precision']}" for r in runs], runs)


# --- section: step / floor (tools/bench.py) ---------------------------------------------------------------


def autocast(precision: str, device):

    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def free_memory(ctx) -> None:

    gc.collect()
    if ctx.cuda:

        torch.cuda.empty_cache()


def section_step_floor(ctx) -> dict:

    import bench

    p = ctx.plan["step_floor"]
    runs = []
    for method, backbone, batch, extra in p["runs"]:
        if ctx.left() < 0:
            runs.append({"method": method, "backbone": backbone, "status": "skipped",
                         "error": "no time left (the section budget or --time-limit)"})
            continue
        overrides = [f"trainer.precision={p['precision']}", f"data.num_workers={p['workers']}", *extra,
                     *method_overrides(method, "synthetic", p, p["image_size"], batch)]  # bench.compose_cfg's data
        try:
            r = bench.bench_one(method, backbone, p["image_size"], batch, warmup=p["warmup"], repeats=p["repeats"],
                                device="cuda" if ctx.cuda else "cpu", patch_size="auto", overrides=overrides)
            r.update(status="ok", precision=p["precision"])
            if method == "mae":  # the same step with the online probe every N steps (probe.every_n_steps=N)
                n = int(ctx.args.probe_every)
                cycles = max(1, math.ceil(p["repeats"] / n))  # whole periods: each timed N steps hold one probe
                amortized = bench.bench_one(method, backbone, p["image_size"], batch, warmup=p["warmup"],
                                            repeats=cycles * n, device="cuda" if ctx.cuda else "cpu",
                                            patch_size="auto", overrides=[*overrides, f"probe.every_n_steps={n}",
                                                                          "eval.online_knn.every_n_epochs=0"])
                step = statistics.fmean(amortized["step_samples_ms"])
                r.update(probe_every=n, amortized_step_ms=step, amortized_network_ms=amortized["network_ms"],
                         amortized_step_samples_ms=amortized["step_samples_ms"],
                         amortized_step_over_network=step / amortized["network_ms"],
                         amortized_how=f"measured: the Trainer step with probe.every_n_steps={n} and the online kNN "
                                       f"off, the mean of {cycles * n} consecutive steps over the median enc+dec")
        except Exception as e:  # noqa: BLE001 - recorded; the next run goes on
            r = {"method": method, "backbone": backbone, "status": "failed", "error": one_line(e)}
        runs.append(r)
        print(f"  {method} {backbone}: {r['status']} {r.get('error', '')}", flush=True)
        free_memory(ctx)
    return with_status({"runs": runs}, [r["method"] for r in runs], runs)


# --- section: end to end (the suite's data path vs torchvision workers) ---------------------------------------


def window_timer(start: int, stop: int, cuda: bool):
    """A Lightning callback timing from the end of training batch ``start`` to the end of batch ``stop`` (the
    device synchronized at both ends only, so the steps in between overlap as in training); it also keeps the
    time of every batch end for the record."""
    import lightning as L

    class WindowTimer(L.Callback):
        def __init__(self):
            self.marks: dict[int, float] = {}
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx in (start, stop) and cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.ends.append(now)
            if batch_idx in (start, stop):
                self.marks[batch_idx] = now

        def seconds(self) -> float:
            return self.marks[stop] - self.marks[start]

    return WindowTimer()


def timed_fit(ctx, cfg, model, steps: int, start: int, fit_kwargs: dict) -> tuple[float, list[float]]:
    """Fit ``model`` for ``steps`` steps with a plain Trainer (the suite's device defaults, no logger or
    checkpoints); (seconds from the end of batch ``start`` to the end of the last, batch-end times)."""
    import lightning as L
    from omegaconf import OmegaConf

    from ssl_vision.devices import device_trainer_kwargs

    timer = window_timer(start, steps - 1, ctx.cuda)
    kwargs = device_trainer_kwargs(OmegaConf.to_container(cfg.trainer, resolve=True), ctx.cuda)
    kwargs.update(accelerator="gpu" if ctx.cuda else "cpu", devices=1, num_nodes=1, strategy="auto",
                  sync_batchnorm=False, max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                  callbacks=[timer])
    trainer = L.Trainer(**kwargs)
    try:
        trainer.fit(model, **fit_kwargs)
    finally:
        shutdown_workers(trainer)
    if trainer.global_step != steps:
        raise RuntimeError(f"{trainer.global_step} of {steps} steps ran")
    t0 = timer.ends[0]
    return timer.seconds(), [round(t - t0, 4) for t in timer.ends]


def shutdown_workers(trainer) -> None:
    """Stop the persistent loader workers of a finished fit now (not at garbage collection), so the next
    measurement has every core."""
    loader = getattr(trainer, "train_dataloader", None)
    for dl in (loader if isinstance(loader, (list, tuple)) else [loader]):
        iterator = getattr(dl, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def e2e_pair(ctx, backbone: str) -> dict:
    """Images/s of SimCLR on ``backbone`` fed by the suite's data path and by the peers' pipeline."""

    import lightning as L
    from hydra import compose, initialize_config_dir

    from ssl_vision.config import conf_dir
    from ssl_vision.data import SSLDataModule
    from ssl_vision.devices import apply_device_defaults
    from ssl_vision.methods import method_class
    from peer_pipeline import peer_fed, peer_loader

    p = ctx.plan["end_to_end"]
    tree = ctx.jpeg_tree()
    overrides = ["method=simclr", f"backbone={backbone}", *jpeg_data(ctx, p), f"trainer.precision={p['precision']}"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    apply_device_defaults(cfg, ctx.cuda)
    steps, start = p["warmup"] + p["timed"], p["warmup"] - 1
    out = {"backbone": backbone, "batch_size": p["batch"], "precision": p["precision"], "workers": p["workers"],
           "image_size": p["image_size"], "canvas_size": p["canvas"], "warmup_steps": p["warmup"],
           "timed_steps": p["timed"], "channels_last": bool(cfg.backbone.get("channels_last"))}
    for pipeline in ("suite", "torchvision_workers"):
        L.seed_everything(0, verbose=False)
        dm = SSLDataModule(cfg.data)
        dm.setup()
        if pipeline == "suite":
            model = method_class("simclr")(cfg, dm.num_classes)
            fit_kwargs = {"datamodule": dm}
        else:
            model = peer_fed(method_class("simclr"))(cfg, dm.num_classes)
            loader = peer_loader(tree / "train", model.augment.views, list(cfg.data.mean), list(cfg.data.std),
                                 p["batch"], p["workers"], pin_memory=ctx.cuda)
            fit_kwargs = {"train_dataloaders": loader}
        seconds, ends = timed_fit(ctx, cfg, model, steps, start, fit_kwargs)
        out[pipeline] = {"images_per_second": p["batch"] * p["timed"] / seconds, "seconds": seconds,
                         "batch_end_seconds": ends}
        del model, dm, fit_kwargs
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    out["speedup"] = out["suite"]["images_per_second"] / out["torchvision_workers"]["images_per_second"]
    out["status"] = "ok"
    return out


def section_end_to_end(ctx) -> dict:
    p = ctx.plan["end_to_end"]
    tree = ctx.jpeg_tree()
    runs = []
    for backbone in p["backbones"]:
        if ctx.left() < 0:
            runs.append({"backbone": backbone, "status": "skipped",
                         "error": "no time left (the section budget or --time-limit)"})
            continue
        try:
            r = e2e_pair(ctx, backbone)
        except Exception as e:  # noqa: BLE001 - recorded; the next backbone goes on
            r = {"backbone": backbone, "status": "failed", "error": one_line(e)}
        runs.append(r)
        print(f"  {backbone}: {r['status']} {r.get('speedup', '')} {r.get('error', '')}", flush=True)
    out = {"runs": runs, "jpegs": jpeg_summary(tree),
           "suite": "ssl_vision: JPEG decode into uint8 canvases in DataLoader workers, augmentation on the device",
           "torchvision_workers": "tools/peer_pipeline.py: solo-learn / lightly - PIL decode and torchvision "
                                  "transforms per image in DataLoader workers, float32 views to the device",
           "timing": "a Trainer step loop; images/s over the timed steps (whole waves of the workers' batches) after "
                     "the warm-up steps; the same SimCLR module, Trainer, batch, precision and workers for both"}
    return with_status(out, [r["backbone"] for r in runs], runs)


# --- section: probes (ssl_vision.evaluation on ImageNet-sized features) ---------------------------------------
# The features live in host memory, as extraction leaves them; the probes stream them to ``ctx.device``
# ``eval.chunk_mb`` at a time (ssl_vision.evaluation), so device memory stays bounded whatever the data size.


def linear_probe_epoch(train_x, train_y, val_x, val_y, num_classes: int, ecfg, device) -> dict:
    """One epoch of the offline linear probe with the protocol of ``ecfg`` (an ``eval`` config) on ``device``."""
    from ssl_vision.evaluation import linear_probe, linear_probe_options, probe_chunk_mb

    return linear_probe(train_x, train_y, val_x, val_y, num_classes, seed=int(ecfg.seed),
                        **{**linear_probe_options(ecfg.linear), "epochs": 1}, device=device,
                        chunk_mb=probe_chunk_mb(ecfg))


def knn_top1(train_x, train_y, queries, query_y, num_classes: int, ecfg, device) -> float:
    """The kNN top-1 of ``queries`` against the bank ``train_x`` (the first ``eval.knn.k``) on ``device``."""
    from ssl_vision.evaluation import knn_accuracy, probe_chunk_mb

    k = int(ecfg.knn.k[0])
    return knn_accuracy(train_x, train_y, queries, query_y, num_classes, [k], float(ecfg.knn.temperature), device,
                        probe_chunk_mb(ecfg))[k]


def synthetic_features(n: int, dim: int, classes: int, device, seed: int, maker=None):
    """Class-structured features on ``device`` and their labels: a fixed random centre per class (the same for
    every ``seed``, so training features and queries share their classes) plus unit noise drawn from ``seed``,
    in chunks on ``maker`` (the GPU when there is one: 2.6 G normals take a CPU thread ~10 s)."""
    maker = maker or device
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)).to(maker)
    g = torch.Generator(device=maker).manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g, device=maker)
    x = torch.empty(n, dim, device=device)
    for i in range(0, n, 65536):
        chunk = torch.randn(min(65536, n - i), dim, generator=g, device=maker) + centres[y[i:i + 65536]]
        x[i:i + 65536] = chunk.to(device)
    return x, y.to(device)


def measured(device, make, run):
    """(result, seconds of ``run(data)``, peak MiB, memory kind) where ``data = make()``: the peak covers making
    the data too (``bench.memory_start`` / ``memory_peak_mb``: CUDA allocations, or the growth of the peak RSS)."""
    import bench

    baseline, kind = bench.memory_start(device)
    data = make()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return result, seconds, bench.memory_peak_mb(device, baseline, kind), kind


def section_probes(ctx) -> dict:
    from hydra import compose, initialize_config_dir

    from ssl_vision.config import conf_dir

    p = ctx.plan["probes"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        ecfg = compose(config_name="train", overrides=["eval=default"]).eval
    device, host = ctx.device, torch.device("cpu")
    n, dim, classes, queries = p["rows"], p["dim"], p["classes"], p["queries"]
    out = {"status": "ok", "probe_device": device.type, "features": [n, dim], "classes": classes, "queries": queries,
           "features_mib": n * dim * 4 / 2**20, "chunk_mb": float(ecfg.chunk_mb),
           "protocol": "eval=default: linear 1 epoch; kNN the first eval.knn.k; features in host memory, streamed "
                       "to the device eval.chunk_mb at a time",
           "memory": "peak device memory of the probe (GPU), or the growth of the process's peak RSS (CPU: the "
                     "host features included)"}
    val_x, val_y = synthetic_features(queries, dim, classes, host, seed=1, maker=ctx.device)

    # the linear probe: one epoch over all the features when a pilot on fewer rows says it fits the time left
    rows = min(n, p["pilot_rows"])
    while True:
        res, seconds, peak, kind = measured(
            device, lambda: synthetic_features(rows, dim, classes, host, seed=0, maker=ctx.device),
            lambda xy: linear_probe_epoch(*xy, val_x, val_y, classes, ecfg, device))
        gc.collect()
        full = seconds * n / rows
        if rows == n or full > 0.4 * ctx.left():
            break
        rows = n
    out["linear"] = {"what": f"linear probe, 1 epoch of {n:,} x {dim} (batch {int(ecfg.linear.batch_size)})",
                     "seconds": full, "rows_timed": rows, "extrapolated": rows < n, "peak_memory_mb": peak,
                     "memory_kind": kind, "top1": res["top1"], "device": device.type}

    # kNN: the whole bank; as many of the queries as the time left allows
    bank = {}

    def make_bank():
        bank["xy"] = synthetic_features(n, dim, classes, host, seed=0, maker=ctx.device)
        return bank["xy"]

    q = min(queries, p["pilot_queries"])
    top1, seconds, peak, kind = measured(device, make_bank,
                                         lambda xy: knn_top1(*xy, val_x[:q], val_y[:q], classes, ecfg, device))
    full = seconds * queries / q
    if q < queries and full < 0.6 * ctx.left():
        q = queries
        top1, full, _, _ = measured(device, lambda: bank["xy"],
                                    lambda xy: knn_top1(*xy, val_x, val_y, classes, ecfg, device))
    out["knn"] = {"what": f"kNN (k={int(ecfg.knn.k[0])}), {queries:,} queries against {n:,} x {dim}",
                  "seconds": full, "rows_timed": q, "extrapolated": q < queries, "peak_memory_mb": peak,
                  "memory_kind": kind, "top1": top1, "device": device.type}
    bank.clear()
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return out


# --- section: gather (DDP equivalence on the device) ------------------------------------------------------------


def section_gather(ctx) -> dict:
    import gather_check as G
    from ssl_vision.methods import METHODS

    p = ctx.plan["gather"]
    batch, size, cap = p["batch"], p["image_size"], p["dim_cap"]
    names = list(METHODS)
    checks = []

    def summarize(what, results, rtol, atol, reference, **extra):
        per = {name: G.difference(results[name], reference[name], rtol, atol) for name in names}
        worst = max(per, key=lambda k: per[k]["worst_tolerance_ratio"])
        checks.append({"what": what, "ok": all(d["ok"] for d in per.values()), "rtol": rtol, "atol": atol,
                       "max_abs_difference": max(d["max_abs_difference"] for d in per.values()),
                       "worst_tolerance_ratio": per[worst]["worst_tolerance_ratio"], "worst_method": worst,
                       "worst_entry": per[worst]["worst_entry"], "methods": per, **extra})

    with G.exact_float32():  # the tolerances assume full float32 on the GPU too
        cpu, on_device, train_bn = {}, {}, {}
        for name in names:
            model = G.build(name, size, batch, cap)
            views, indexes = G.fixed_views(model, batch, size)
            cpu[name] = G.one_step(model, views, indexes, torch.device("cpu"), "eval")
            on_device[name] = G.one_step(G.build(name, size, batch, cap), views, indexes, ctx.device, "eval")
            if ctx.cuda and ctx.gpus >= 2:
                train_bn[name] = G.one_step(G.build(name, size, batch, cap), views, indexes, ctx.device, "train")
        summarize(f"1 process: {ctx.device.type} step = cpu step, {len(names)} methods", on_device,
                  G.RTOL_CROSS_DEVICE if ctx.cuda else G.RTOL_SAME_DEVICE,
                  G.ATOL_CROSS_DEVICE if ctx.cuda else G.ATOL_SAME_DEVICE, cpu)
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
            if ctx.cuda and ctx.gpus >= 2:
                ranks = G.run_two_ranks("nccl", names, batch, size, cap, "sync", tmp, "spawn")
                summarize(f"2 NCCL ranks (SyncBatchNorm) = 1 process on the GPU, {len(names)} methods", ranks,
                          G.RTOL_SAME_DEVICE, G.ATOL_SAME_DEVICE, train_bn)
            elif ctx.cuda:
                checks.append({"what": "2 NCCL ranks = 1 process", "skipped": f"needs 2 GPUs, found {ctx.gpus}"})
            else:
                # fork: the CPU lane's worker has no CUDA state, and a fork does not re-import torch (seconds on CI)
                ranks = G.run_two_ranks("gloo", names, batch, size, cap, "eval", tmp, "fork")
                summarize(f"2 gloo ranks = 1 process on the CPU, {len(names)} methods", ranks, G.RTOL_SAME_DEVICE,
                          G.ATOL_SAME_DEVICE, cpu)
    failed = [c["what"] for c in checks if not c.get("skipped") and not c["ok"]]
    out = {"status": "failed" if failed else "ok", "checks": checks, "batch": batch, "image_size": size,
           "head_dim_cap": cap, "methods": names}
    if failed:
        out["error"] = "differences beyond the tolerance: " + "; ".join(failed)
    return out


# --- the worker's loop --------------------------------------------------------------------------------------


def worker(args) -> int:

    progress = open(args.progress, "a")

    def emit(**event):
        progress.write(json.dumps(event, default=str) + "\n")
        progress.flush()

    try:

        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        if not cuda and not args.tiny:
            raise RuntimeError("no CUDA device: the full sizes need a GPU; the CPU lane is --device cpu --tiny")
        if args.tiny and not cuda:
            torch.set_num_threads(1)  # CI's shared cores: each multi-threaded op would wait for a busy second one
        import logging
        import warnings

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*LeafSpec.*",
                        ".*overridden `on_(before|after)_batch_transfer`.*", ".*exists and is not empty.*"):
            warnings.filterwarnings("ignore", message=pattern)
        ctx = Context(args, torch.device("cuda" if cuda else "cpu"), Path(args.workdir))
    except Exception as e:  # noqa: BLE001 - nothing can run: the parent records it for every section
        emit(event="fatal", error=one_line(e))
        traceback.print_exc()
        return 2
    functions = {"environment": section_environment, "methods": section_methods, "step_floor": section_step_floor,
                 "end_to_end": section_end_to_end, "probes": section_probes, "gather": section_gather}
    for name in args.sections:
        emit(event="start", section=name)
        if name == args.crash_in:
            os._exit(9)  # as a segfault or the OOM killer would: no result, no clean-up
        ctx.start(name)
        start = time.perf_counter()
        try:
            result = functions[name](ctx)
        except Exception as e:  # noqa: BLE001 - the section's error line; the other sections still run
            traceback.print_exc()
            result = {"status": "failed", "error": one_line(e)}
            if isinstance(e, ModuleNotFoundError):
                result["error"] += (" (a bare GPU machine needs the wheels of tools/fetch_gpu_wheels.sh installed: "
                                    "see the top of tools/gpu_check.py)")
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["budget_seconds"] = budget_of(name, args)
        result["device"] = ctx.device.type
        emit(event="done", section=name, result=result)
        if result["status"] != "ok" and ctx.cuda:
            return 3  # a fresh process (and CUDA context) for the remaining sections
    return 0


