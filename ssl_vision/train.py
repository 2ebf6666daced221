"""``ssl-vision-train``: pre-train, probe and summarize one run (Hydra entry point)."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from . import preemption
from .callbacks import (AtomicCheckpointIO, CheckpointWriteError, LastCheckpoint, Throughput, check_checkpoint_config,
                        config_callbacks, progress_callbacks, versions)
from .cli import RunFailed, entry_point
from .config import ConfigError
from .data import SkippedFilesReport, SSLDataModule
from .devices import apply_device_defaults, device_name, device_trainer_kwargs, trains_on_gpu
from .evaluation import check_probe_memory, evaluate_backbone, load_checkpoint
from .loggers import LoggerRunIds, build_loggers
from .methods import build_method
from .optim import gradient_accumulation_check
from .rundir import continue_command, launch_overrides

log = logging.getLogger("ssl_vision")

for _pattern in (".*overridden `on_(before|after)_batch_transfer`.*", ".*litlogger.*", ".*exists and is not empty.*",
                 ".*LeafSpec.*", ".*does not have many workers.*",
                 ".*dataloader is not resumable.*"):  # it is: SSLDataModule saves the epoch position
    warnings.filterwarnings("ignore", message=_pattern)


def run_dir_of(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/run")


def resume_point(cfg: DictConfig, out: Path) -> tuple[Path | None, int]:
    """The checkpoint to continue from and its step: ``resume=auto``, the run directory's last.ckpt if
    there is one, or if it is unreadable (e.g. truncated) the newest readable older version
    (``last-1.ckpt``, ...), with a warning naming both; ``resume=PATH``; ``resume=null``: (None, 0)."""
    choice = cfg.get("resume", "auto")
    if choice in (None, False, "none", "null"):
        return None, 0
    if choice == "auto":
        candidates = versions(out / "checkpoints" / "last.ckpt")
        if not candidates:
            return None, 0
    else:
        candidates = [Path(str(choice)).expanduser()]
        if not candidates[0].is_file():
            raise ConfigError(f"resume: checkpoint '{candidates[0]}' does not exist")
    unreadable = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            stored, step = ckpt["hyper_parameters"]["cfg"], int(ckpt["global_step"])
            break
        except Exception as e:  # noqa: BLE001 - truncated, garbled, not a checkpoint: try the previous one
            unreadable.append(f"{path} ({_first_line(e)})")
    else:
        if choice != "auto":
            raise ConfigError(f"resume: checkpoint {unreadable[0]} is unreadable")
        raise ConfigError(f"resume: no readable checkpoint: {'; '.join(unreadable)}; move them away, or "
                          "resume=null to start over")
    if unreadable and rank_zero_only.rank == 0:
        log.warning("checkpoint %s is unreadable; resuming from the previous checkpoint %s (step %d)",
                    "; ".join(unreadable), path, step)
    for key in ("method", "backbone"):
        if stored[key]["name"] != cfg[key].name:
            raise ConfigError(
                f"resume: checkpoint '{path}' was trained with {key} '{stored[key]['name']}', but this config "
                f"has {key} '{cfg[key].name}'; use {key}={stored[key]['name']} or a new run directory"
            )
    return path, step


def _first_line(e: BaseException) -> str:
    """The first sentence of ``e``'s message, on one line (torch's unreadable-file errors go on for lines)."""
    text = " ".join(str(e).split()).split(". ")[0] or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def build_trainer(cfg: DictConfig, out: Path, labelled: bool = True, resume_step: int | None = None,
                  ckpt_path: Path | None = None) -> tuple[L.Trainer, Throughput]:
    """The run's Lightning Trainer: ``cfg.trainer`` with the device defaults, the ``logger`` group's loggers
    (``ssl_vision.loggers``; ``resume_step`` / ``ckpt_path``: the checkpoint a resumed run continues, whose
    metrics.csv rows and W&B / MLflow run ids it keeps), the suite's own callbacks - ``LastCheckpoint``
    (``checkpoint.*``), the stop on SIGTERM / SIGINT, ``Throughput`` (images/s, FLOPs, MFU),
    ``SkippedFilesReport``, progress lines when stdout is not a terminal (``progress.*``) - then the
    ``callbacks`` mapping's, each built with ``hydra.utils.instantiate``."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    on_gpu = trains_on_gpu(kwargs)
    kwargs = device_trainer_kwargs(kwargs, on_gpu)  # cuDNN autotuning on GPUs; DDP without buffer broadcasts
    if kwargs.get("sync_batchnorm") and not on_gpu:
        # torch implements SyncBatchNorm for GPUs only; CPU ranks keep per-rank batch statistics
        log.warning("trainer.sync_batchnorm: SyncBatchNorm needs GPUs; on CPU each rank uses its own batch statistics")
        kwargs["sync_batchnorm"] = False
    if not labelled:
        kwargs["limit_val_batches"] = 0  # no labels: nothing to validate the online probe on
    throughput = Throughput()
    ckpt_cfg = check_checkpoint_config(cfg.checkpoint)
    io = AtomicCheckpointIO(keep_last=ckpt_cfg["keep_last"])
    last = LastCheckpoint(out / "checkpoints", every_n_steps=ckpt_cfg["every_n_steps"],
                          every_n_epochs=ckpt_cfg["every_n_epochs"], io=io)
    loggers = build_loggers(cfg.get("logger"), out, resume_step, ckpt_path)
    extra = config_callbacks(cfg.get("callbacks"))
    callbacks = [last, throughput, SkippedFilesReport(), LoggerRunIds(loggers)]
    callbacks += progress_callbacks(cfg.get("progress"), kwargs, extra) + extra
    guard = preemption.active()
    if guard is not None:  # after LastCheckpoint: a stop at a step it saved already does not save twice
        callbacks.insert(1, preemption.StopOnSignal(guard, last))
    try:
        trainer = L.Trainer(**kwargs, default_root_dir=str(out), logger=list(loggers.values()) or False,
                            callbacks=callbacks, enable_checkpointing=False, plugins=[io])
    except (ValueError, TypeError, ImportError, MisconfigurationException) as e:  # Lightning's own check of a trainer.* value
        raise ConfigError(f"trainer{_trainer_key(str(e), kwargs)}: {' '.join(str(e).split())}") from None
    if guard is not None:
        # Lightning 2.6 would install its own SIGTERM handler for fit (stop anywhere in the step, no save, exit
        # code 0; a collective inside the handler); the guard's handlers stay instead (ssl_vision/preemption.py)
        trainer._signal_connector.register_signal_handlers = lambda: None
    return trainer, throughput


def _trainer_key(message: str, kwargs: dict) -> str:
    """``.precision`` when Lightning's ``message`` names that trainer setting (its messages say which)."""
    lowered = message.lower()
    named = [k for k in kwargs if f"{k}=" in lowered] or \
        [k for k in kwargs if k.replace("_", " ") in lowered or k in lowered]
    return f".{max(named, key=len)}" if named else ""


def peak_memory(trainer: L.Trainer) -> dict:
    """This process's peak memory so far, in MiB: ``torch.cuda.max_memory_allocated`` when it trained on a
    GPU, else the peak resident set size (``ru_maxrss``); ``peak_memory_kind`` says which."""
    if trainer.strategy.root_device.type == "cuda":
        mb, kind = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20, "cuda_max_memory_allocated"
    else:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        mb, kind = rss / (2**20 if sys.platform == "darwin" else 1024), "cpu_peak_rss"
    return {"peak_memory_mb": round(mb, 1), "peak_memory_kind": kind}


def git_commit(package_dir: Path | None = None) -> dict:
    """``{"git_commit": sha, "git_dirty": bool}`` when ``ssl_vision`` runs from a git checkout of this project
    (the repository's top level holds this package and pyproject.toml), else ``{}``: an installed package,
    no git, or git failing."""
    import subprocess

    here = (package_dir or Path(__file__).resolve().parent)
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        top = Path(git("rev-parse", "--show-toplevel"))
        if (top / here.name).resolve() != here.resolve() or not (top / "pyproject.toml").is_file():
            return {}  # e.g. site-packages inside some other repository
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain",
                                                                                 "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def provenance(trainer: L.Trainer) -> dict:
    """What produced the run: the package version (and git commit from a checkout), the versions of torch,
    lightning, timm and kornia, the devices (each rank's device name, gathered: {name: count}), the
    precision and float32 matmul setting. Called on every rank (one gather of the names)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    device = trainer.strategy.root_device
    names = [device_name(device)]
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        names = [None] * trainer.world_size
        torch.distributed.all_gather_object(names, device_name(device))
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return {
        "ssl_vision_version": __version__, **git_commit(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     **{p: installed(p) for p in ("lightning", "timm", "kornia", "torchvision")}},
        "accelerator": device.type, "devices": counts, "world_size": int(trainer.world_size),
        "num_nodes": int(trainer.num_nodes), "precision": str(trainer.precision),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        **({"cuda": torch.version.cuda} if device.type == "cuda" else {"cpu_threads": torch.get_num_threads()}),
    }


def write_plots(out: Path, val_features=None, class_names=(), seed: int = 0) -> list[str]:
    """``out/training_curves.png`` from ``out/metrics.csv``, and ``out/embedding.png`` of
    ``val_features`` = (val_x (N, D), val_y (N,)) when given. A plot that fails is logged as one
    warning and left out (a finished run is never lost to a plot); returns the paths written."""
    from .plots import plot_embedding, plot_training_curves

    jobs = [("training_curves.png", lambda path: plot_training_curves(out / "metrics.csv", path))] \
        if (out / "metrics.csv").is_file() else []  # no csv logger (logger=tensorboard alone): no curves
    if val_features is not None:
        jobs.append(("embedding.png", lambda path: plot_embedding(*val_features, class_names, path, seed=seed)))
    written = []
    for name, plot in jobs:
        try:
            plot(out / name)
            written.append(str(out / name))
        except Exception as e:  # noqa: BLE001 - any plotting error must leave the run's results intact
            log.warning("plots: %s was not written (%s: %s); the run's results are unaffected",
                        name, type(e).__name__, e)
    return written


def run(cfg: DictConfig) -> dict:
    """Pre-train with ``cfg``, evaluate the backbone, write ``summary.json``; return the summary."""
    out = run_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, resume_step = resume_point(cfg, out)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    gradient_accumulation_check(cfg, int(cfg.trainer.get("accumulate_grad_batches") or 1))
    dm = SSLDataModule(cfg.data)
    dm.setup()
    apply_device_defaults(cfg, trains_on_gpu(OmegaConf.to_container(cfg.trainer, resolve=True)))
    model = build_method(cfg, dm.num_classes)
    devices, nodes = cfg.trainer.get("devices"), int(cfg.trainer.get("num_nodes", 1))
    if isinstance(devices, int) and hasattr(model, "check_queue_size"):  # fail before the Trainer starts
        model.check_queue_size(int(cfg.data.batch_size) * devices * nodes)
    trainer, throughput = build_trainer(cfg, out, labelled=dm.num_classes > 0,
                                        resume_step=resume_step if ckpt_path else None, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    summary: dict = {
        "method": cfg.method.name, "backbone": cfg.backbone.name, "data": cfg.data.name,
        "image_size": int(cfg.data.image_size), "batch_size": int(cfg.data.batch_size),
        "epochs": int(cfg.trainer.max_epochs), "world_size": int(trainer.world_size),
    }
    if HydraConfig.initialized():
        summary["overrides"] = list(HydraConfig.get().overrides.task)
    evaluate = bool(cfg.eval.enabled) and dm.num_classes > 0
    if evaluate:  # settings the end-of-run probes cannot hold (eval.feature_memory_gb) fail now, not after training
        check_probe_memory(cfg.eval, dm, model.feat_dim)
    # the Trainer's device for this rank (Lightning moves the model back to the CPU after fit)
    device = trainer.strategy.root_device
    baseline_file = out / "random_init.json"  # kept for a resumed run's summary
    baseline = None
    if evaluate and cfg.eval.random_init_baseline and ckpt_path is None:
        baseline = RandomInitBaseline(dm, cfg.eval, baseline_file)  # at fit start: sharded over the ranks
        trainer.callbacks.append(baseline)
    if ckpt_path is not None:
        if trainer.is_global_zero:
            log.info("resuming from %s", ckpt_path)
        if evaluate and cfg.eval.random_init_baseline and baseline_file.is_file():
            summary.update(json.loads(baseline_file.read_text()))
    elif HydraConfig.initialized() and HydraConfig.get().mode.name == "RUN" and trainer.is_global_zero:
        log.info("run directory %s; if this run is interrupted, this command continues it from its last "
                 "checkpoint: %s", out, continue_command(out))

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        # a signal after the last step stops here, before evaluation; later ones stop at once
        preemption.after_fit(trainer, out / "checkpoints" / "last.ckpt")
    except FloatingPointError as e:
        last = out / "checkpoints" / "last.ckpt"
        kept = f"; the last good checkpoint is {last}" if last.is_file() else "; no checkpoint was written yet"
        raise RunFailed(f"{e}{kept}") from None
    except CheckpointWriteError as e:
        raise RunFailed(str(e)) from None
    if baseline is not None:
        summary.update(baseline.metrics)
    summary["train_seconds"] = round(time.perf_counter() - start - (baseline.seconds if baseline else 0.0), 2)
    summary["steps"] = int(trainer.global_step)
    summary.update(throughput.summary())  # images/s in total and per device, FLOPs per image, MFU
    probe_acc = trainer.callback_metrics.get("val/probe_top1")
    summary["online_probe_top1"] = float(probe_acc) if probe_acc is not None else None
    knn_acc = trainer.callback_metrics.get("val/knn_top1")  # eval.online_knn: the last epoch that ran it
    summary["online_knn_top1"] = float(knn_acc) if knn_acc is not None else None
    summary["checkpoint"] = str(out / "checkpoints" / "last.ckpt")
    val_features = None
    if evaluate:
        metrics, val_features = evaluate_backbone(model.backbone.to(device), dm, model.eval_transform, cfg.eval, device,
                                                  return_features=True)
        summary.update(metrics)
        dm.report_skipped("during evaluation")
    elif dm.num_classes == 0:
        log.warning("the data has no labels: linear probe and kNN were skipped")
    summary.update(peak_memory(trainer))  # before the plots: the run's own peak
    summary["provenance"] = provenance(trainer)  # every rank: the device names are gathered
    if trainer.is_global_zero:
        if cfg.get("plots", True):
            summary["plots"] = write_plots(out, val_features, dm.class_names, int(cfg.seed))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    return summary


class RandomInitBaseline(L.Callback):
    """The probes of the untrained backbone, at fit start: the process group exists then, so each rank
    embeds its share of the data on its own device, rank 0 alone runs the probes and writes
    ``random_init.json``, and every rank gets the metrics (``evaluate_backbone``). Before ``fit`` every rank
    would evaluate the whole data set itself, and on the default GPU."""

    def __init__(self, datamodule, ecfg, path: Path):
        self.datamodule, self.ecfg, self.path = datamodule, ecfg, path
        self.metrics: dict = {}
        self.seconds = 0.0

    def on_fit_start(self, trainer, pl_module):
        start = time.perf_counter()
        base = evaluate_backbone(pl_module.backbone, self.datamodule, pl_module.eval_transform, self.ecfg,
                                 trainer.strategy.root_device)
        self.metrics = {"random_init_linear_probe_top1": base["linear_probe_top1"],
                        "random_init_knn_top1": base["knn_top1"]}
        if "linear_probe_top1_std" in base:  # eval.seeds
            self.metrics["random_init_linear_probe_top1_std"] = base["linear_probe_top1_std"]
        if trainer.is_global_zero:  # files and info logs: rank 0 only
            self.path.write_text(json.dumps(self.metrics, indent=2) + "\n")
            log.info("random-init backbone: linear top-1 %.4f, kNN top-1 %.4f", base["linear_probe_top1"],
                     base["knn_top1"])
        self.seconds = time.perf_counter() - start



main = entry_point("train", run, argv=launch_overrides,
                   guard=lambda cfg: preemption.SignalGuard(continue_command(run_dir_of(cfg))))


if __name__ == "__main__":
    main()
