"""``ssl-vision-train``: pre-train, probe and summarize one run (Hydra entry point)."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from .callbacks import AtomicCheckpointIO, LastCheckpoint, RunCSVLogger, Throughput
from .config import ConfigError, check_overrides, conf_dir
from .data import SkippedFilesReport, SSLDataModule
from .evaluation import evaluate_backbone, load_checkpoint
from .methods import build_method

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
    there is one; ``resume=PATH``; ``resume=null``: (None, 0)."""
    choice = cfg.get("resume", "auto")
    if choice in (None, False, "none", "null"):
        return None, 0
    path = out / "checkpoints" / "last.ckpt" if choice == "auto" else Path(str(choice)).expanduser()
    if choice != "auto" and not path.is_file():
        raise ConfigError(f"resume: checkpoint '{path}' does not exist")
    if not path.is_file():
        return None, 0
    ckpt = load_checkpoint(path)
    stored = ckpt["hyper_parameters"]["cfg"]
    for key in ("method", "backbone"):
        if stored[key]["name"] != cfg[key].name:
            raise ConfigError(
                f"resume: checkpoint '{path}' was trained with {key} '{stored[key]['name']}', but this config "
                f"has {key} '{cfg[key].name}'; use {key}={stored[key]['name']} or a new run directory"
            )
    return path, int(ckpt.get("global_step", 0))


def build_trainer(cfg: DictConfig, out: Path, labelled: bool = True, resume_step: int | None = None
                  ) -> tuple[L.Trainer, Throughput]:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    on_gpu = kwargs.get("accelerator") in ("gpu", "cuda") or (kwargs.get("accelerator") == "auto"
                                                               and torch.cuda.is_available())
    if kwargs.get("sync_batchnorm") and not on_gpu:
        # torch implements SyncBatchNorm for GPUs only; CPU ranks keep per-rank batch statistics
        log.warning("trainer.sync_batchnorm: SyncBatchNorm needs GPUs; on CPU each rank uses its own batch statistics")
        kwargs["sync_batchnorm"] = False
    if not labelled:
        kwargs["limit_val_batches"] = 0  # no labels: nothing to validate the online probe on
    throughput = Throughput()
    callbacks = [LastCheckpoint(out / "checkpoints", every_n_steps=cfg.checkpoint.every_n_steps), throughput,
                 SkippedFilesReport()]
    try:
        trainer = L.Trainer(**kwargs, default_root_dir=str(out), logger=RunCSVLogger(str(out), resume_step),
                            callbacks=callbacks, enable_checkpointing=False, plugins=[AtomicCheckpointIO()])
    except (ValueError, TypeError, ImportError, MisconfigurationException) as e:  # Lightning's own check of a trainer.* value
        raise ConfigError(f"trainer{_trainer_key(str(e), kwargs)}: {' '.join(str(e).split())}") from None
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


def write_plots(out: Path, val_features=None, class_names=(), seed: int = 0) -> list[str]:
    """``out/training_curves.png`` from ``out/metrics.csv``, and ``out/embedding.png`` of
    ``val_features`` = (val_x (N, D), val_y (N,)) when given. A plot that fails is logged as one
    warning and left out (a finished run is never lost to a plot); returns the paths written."""
    from .plots import plot_embedding, plot_training_curves

    jobs = [("training_curves.png", lambda path: plot_training_curves(out / "metrics.csv", path))]
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
    dm = SSLDataModule(cfg.data)
    dm.setup()
    model = build_method(cfg, dm.num_classes)
    devices, nodes = cfg.trainer.get("devices"), int(cfg.trainer.get("num_nodes", 1))
    if isinstance(devices, int) and hasattr(model, "check_queue_size"):  # fail before the Trainer starts
        model.check_queue_size(int(cfg.data.batch_size) * devices * nodes)
    trainer, throughput = build_trainer(cfg, out, labelled=dm.num_classes > 0,
                                        resume_step=resume_step if ckpt_path else None)
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
    # the Trainer's device for this rank (Lightning moves the model back to the CPU after fit)
    device = trainer.strategy.root_device
    baseline_file = out / "random_init.json"  # kept for a resumed run's summary
    if evaluate and cfg.eval.random_init_baseline and ckpt_path is None:
        base = evaluate_backbone(model.backbone.to(device), dm, model.eval_transform, cfg.eval, device)
        baseline = {"random_init_linear_probe_top1": base["linear_probe_top1"],
                    "random_init_knn_top1": base["knn_top1"]}
        summary.update(baseline)
        if trainer.is_global_zero:  # files and info logs: rank 0 only
            baseline_file.write_text(json.dumps(baseline, indent=2) + "\n")
            log.info("random-init backbone: linear top-1 %.4f, kNN top-1 %.4f", base["linear_probe_top1"],
                     base["knn_top1"])
    if ckpt_path is not None:
        if trainer.is_global_zero:
            log.info("resuming from %s", ckpt_path)
        if evaluate and cfg.eval.random_init_baseline and baseline_file.is_file():
            summary.update(json.loads(baseline_file.read_text()))
    elif HydraConfig.initialized() and HydraConfig.get().mode.name == "RUN" and trainer.is_global_zero:
        command = " ".join(["ssl-vision-train", *summary.get("overrides", []), f"hydra.run.dir={out}"])
        log.info("run directory %s; if this run is interrupted, the same command with hydra.run.dir "
                 "continues it from its last checkpoint: %s", out, command)

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except FloatingPointError as e:
        last = out / "checkpoints" / "last.ckpt"
        kept = f"; the last good checkpoint is {last}" if last.is_file() else "; no checkpoint was written yet"
        raise TrainingFailed(f"{e}{kept}") from None
    summary["train_seconds"] = round(time.perf_counter() - start, 2)
    summary["steps"] = int(trainer.global_step)
    summary["train_images_per_second"] = throughput.images_per_second
    probe_acc = trainer.callback_metrics.get("val/probe_top1")
    summary["online_probe_top1"] = float(probe_acc) if probe_acc is not None else None
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
    if trainer.is_global_zero:
        if cfg.get("plots", True):
            summary["plots"] = write_plots(out, val_features, dm.class_names, int(cfg.seed))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    return summary


class TrainingFailed(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message says why and what was kept."""


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    try:
        check_overrides(sys.argv[1:], "train")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
