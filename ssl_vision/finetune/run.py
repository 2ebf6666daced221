"""``ssl-vision-finetune checkpoint=<run>/checkpoints/last.ckpt``: the job - data, one fine-tune per seed (and
per initialisation), the summary, plots and the timm export.

Each fine-tune is one Lightning ``fit`` through ``train.build_trainer`` (the training run's versioned
``last.ckpt``, exact resume, signals, loggers, DDP) in its own directory: the run directory itself, or
``seed<k>/`` per seed of ``finetune.seeds``, each with a ``random_init/`` twin under ``finetune.random_init``.
A finished fine-tune leaves ``finetune_result.json``; rerunning the command (``resume=auto``) skips those and
continues the others from their ``last.ckpt``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import preemption
from ..backbones import timm_name
from ..callbacks import CheckpointWriteError
from ..cli import RunFailed, entry_point
from ..config import ConfigError
from ..data import SSLDataModule
from ..devices import apply_device_defaults, trains_on_gpu
from ..evaluation import load_checkpoint
from ..probe import probe_data_config
from ..rundir import continue_command, launch_overrides
from ..train import build_trainer, peak_memory, resume_point, run_dir_of
from .model import classifier_kwargs, init_head, load_pretrained
from .module import FineTuner

log = logging.getLogger("ssl_vision")

RESULT = "finetune_result.json"
SUMMARY = "finetune_summary.json"
CURVES = "finetune_curves.png"
EXPORT = "finetuned.safetensors"
INITS = ("pretrained", "random")


class FineTuneData(SSLDataModule):
    """The labelled training images (``probe_train_set``: ``data.label_fraction`` and label subsets applied)
    are the training set; validation is ``val_set``, each image evaluated exactly once over the ranks
    (Lightning's distributed sampler would pad the last ranks' shares with repeats)."""

    def setup(self, stage=None):
        super().setup(stage)
        train = self.probe_train_set
        if train is None:
            raise ConfigError(f"data: '{self.cfg.name}' has no labels, so there is nothing to fine-tune on; "
                              "choose labelled data (data=...)")
        known = torch.nonzero(train.labels >= 0)[:, 0]
        if len(known) < len(train):
            from ..data import ImageSubset

            train = ImageSubset(train, known)
        self.pretrain_set = train
        if int(self.cfg.batch_size) > len(train):
            raise ConfigError(f"finetune.batch_size: {int(self.cfg.batch_size)} images per device is more than the "
                              f"{len(train)} labelled training images; use a smaller batch")

    def val_dataloader(self):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return super().val_dataloader()
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=torch.distributed.get_world_size(),
                                               rank=torch.distributed.get_rank(), shuffle=False)
        return self._loader(self.val_set, shuffle=False, drop_last=False, sampler=sampler)


def job_config(cfg: DictConfig, train_cfg: DictConfig, seed: int, init: str) -> DictConfig:
    """The config of one fine-tune, shaped like a training run's (what ``build_trainer``, ``FineTuner`` and
    ``export`` read): the pre-trained backbone with a head, this job's data, ``finetune.optimizer`` and
    ``finetune.augment`` as ``optimizer`` / ``augment``, ``checkpointing`` as ``checkpoint``; the other top-level
    keys (trainer, loggers, ...) as given."""
    ft = cfg.finetune
    keep = {k: cfg[k] for k in cfg if k not in ("checkpoint", "checkpointing", "data", "finetune")}
    bcfg = OmegaConf.create(OmegaConf.to_container(train_cfg.backbone, resolve=True))
    with open_dict(bcfg):
        bcfg.channels_last = None  # this job's device decides (ssl_vision/devices.py)
        bcfg.kwargs = classifier_kwargs(bcfg, ft, 0, timm_name(bcfg.name).startswith(("vit", "deit")))
    dcfg = OmegaConf.create(OmegaConf.to_container(probe_data_config(train_cfg, cfg.get("data")), resolve=True))
    job = OmegaConf.create({
        **{k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in keep.items()},
        "seed": int(seed),
        "checkpoint": OmegaConf.to_container(cfg.checkpointing, resolve=True),
        "method": {"name": "finetune", "pretrained": str(train_cfg.method.name), "checkpoint": str(cfg.checkpoint)},
        "backbone": OmegaConf.to_container(bcfg), "data": OmegaConf.to_container(dcfg),
        "optimizer": OmegaConf.to_container(ft.optimizer, resolve=True),
        "augment": OmegaConf.to_container(ft.augment, resolve=True),
        "finetune": {**OmegaConf.to_container(ft, resolve=True), "init": init},
    })
    return job


def check_finetune_config(ft) -> None:
    """One-line errors for the ``finetune.*`` values that are not checked where they are used."""
    if ft.optimizer.name not in ("adamw", "sgd"):
        raise ConfigError(f"finetune.optimizer.name: unknown optimizer '{ft.optimizer.name}'; choose one of: "
                          "adamw, sgd")
    if ft.get("layer_decay") is not None and not 0 < float(ft.layer_decay) <= 1:
        raise ConfigError(f"finetune.layer_decay: {ft.layer_decay} must be in (0, 1] (null: off)")
    if int(ft.batch_size) < 1:
        raise ConfigError(f"finetune.batch_size: must be a positive number of images, got {ft.batch_size}")
    seeds = ft.get("seeds")
    if seeds is not None and (not OmegaConf.is_list(seeds) or not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"finetune.seeds: {seeds} should be a list of distinct seeds, e.g. [0,1,2] (null: seed)")


def per_device_batch(global_batch: int, world: int, accumulate: int, mixup: bool) -> int:
    """``finetune.batch_size`` (the global batch, as the references state it) per device and micro-batch."""
    parts = world * accumulate
    if global_batch % parts:
        raise ConfigError(f"finetune.batch_size: {global_batch} does not split over {world} device(s) x "
                          f"{accumulate} accumulated batch(es); use a multiple of {parts}")
    per = global_batch // parts
    if mixup and per % 2:
        raise ConfigError(f"finetune.batch_size: mixup pairs each image with another of its batch, so the batch per "
                          f"device ({per}) must be even")
    return per


def finetune_one(cfg: DictConfig, train_cfg: DictConfig, ckpt: dict, seed: int, init: str, out: Path) -> dict:
    """One fine-tune in ``out``: its result (``finetune_result.json``), also when it was finished earlier."""
    out.mkdir(parents=True, exist_ok=True)
    done = out / RESULT
    job = job_config(cfg, train_cfg, seed, init)
    length = [int(job.trainer.max_epochs), int(job.trainer.get("max_steps", -1))]
    if done.is_file() and cfg.get("resume", "auto") == "auto":
        result = json.loads(done.read_text())
        if result.get("length") == length:  # finished with this length (a longer one continues it)
            return result
    ckpt_path, resume_step = resume_point(job, out)
    L.seed_everything(int(seed), workers=True, verbose=False)
    trainer, throughput = build_trainer(job, out, labelled=True, resume_step=resume_step if ckpt_path else None)
    mixup = bool(job.finetune.get("mixup"))
    with open_dict(job):
        job.data.batch_size = per_device_batch(int(job.finetune.batch_size), int(trainer.world_size),
                                               int(trainer.accumulate_grad_batches), mixup)
    dm = FineTuneData(job.data)
    dm.setup()
    with open_dict(job):
        job.backbone.kwargs.num_classes = dm.num_classes
    apply_device_defaults(job, trains_on_gpu(OmegaConf.to_container(job.trainer, resolve=True)))
    model = FineTuner(job, dm.num_classes)
    if init == "pretrained":
        load_pretrained(model.backbone, ckpt["state_dict"])
    init_head(model.backbone, str(job.finetune.get("head_init", "trunc_normal")),
              float(job.finetune.get("head_init_std", 2e-5)))
    if trainer.is_global_zero:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(job, resolve=True))
        if ckpt_path is not None:
            log.info("resuming the %s fine-tune (seed %d) from %s", init, seed, ckpt_path)
    start = time.perf_counter()
    last = out / "checkpoints" / "last.ckpt"
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        preemption.after_fit(trainer, last)
        if model.validated_step != trainer.global_step:  # e.g. check_val_every_n_epoch > 1: the end's metrics
            trainer.validate(model, datamodule=dm, verbose=False)
    except FloatingPointError as e:
        kept = f"; the last good checkpoint is {last}" if last.is_file() else "; no checkpoint was written yet"
        raise RunFailed(f"{e}{kept}") from None
    except CheckpointWriteError as e:
        raise RunFailed(str(e)) from None
    metrics = trainer.callback_metrics
    result = {
        "init": init, "seed": int(seed), "top1": float(metrics["val/top1"]), "top5": float(metrics["val/top5"]),
        "max_top1": _max_column(out / "metrics.csv", "val/top1"), "steps": int(trainer.global_step),
        "epochs": int(trainer.max_epochs), "length": length, "world_size": int(trainer.world_size),
        "global_batch_size": int(model.global_batch_size()), "lr": model.base_lr(),
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_images_per_second": throughput.images_per_second, "checkpoint": str(last),
        **peak_memory(trainer),
    }
    if trainer.is_global_zero:
        if cfg.get("plots", True):
            result["plots"] = write_curves(out / CURVES, [(f"{init} seed {seed}", out / "metrics.csv")])
        if init == "pretrained" and cfg.get("export", True):
            result["export"] = export_model(last, out / EXPORT)
        done.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s fine-tune, seed %d: top-1 %.4f, top-5 %.4f", init, seed, result["top1"], result["top5"])
    return result


def _max_column(metrics_csv: Path, key: str) -> float | None:
    """The largest value of ``key`` in a metrics.csv (MAE's ``max_accuracy``); None where it is not on disk."""
    import csv

    if not metrics_csv.is_file():
        return None
    with open(metrics_csv, newline="") as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    return max(values) if values else None


def write_curves(path: Path, runs: list[tuple[str, Path]]) -> list[str]:
    """``path``: training loss, validation top-1 / top-5 and learning rate of each fine-tune in ``runs``
    ((label, metrics.csv) pairs), from the runs' metrics.csv; a failed plot is one warning (results stay)."""
    try:
        from .plots import plot_finetune_curves

        plot_finetune_curves(runs, path)
        return [str(path)]
    except Exception as e:  # noqa: BLE001 - a plot must never cost a finished fine-tune its results
        log.warning("plots: %s was not written (%s: %s); the results are unaffected", path.name, type(e).__name__, e)
        return []


def export_model(checkpoint: Path, weights: Path) -> dict:
    """The fine-tuned classifier as timm weights + sidecar (``ssl_vision.export``, verified by reloading)."""
    from ..export import export_backbone

    try:
        w, sidecar = export_backbone(checkpoint, weights)
    except (RuntimeError, ConfigError) as e:
        log.warning("export: %s was not written (%s)", weights, e)
        return {}
    return {"weights": str(w), "sidecar": str(sidecar)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (population, ddof 0: how MAE's FINETUNE.md reports its 4 seeds)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(t) > 1 else 0.0


def summarize(results: dict, seeds: list[int], inits: list[str]) -> dict:
    """The summary's metrics: ``finetune_top1`` / ``_top5`` (and ``random_init_finetune_*``); with several seeds
    their means, with ``_std`` and ``_per_seed`` next to them."""
    out = {}
    for init in inits:
        prefix = "finetune" if init == "pretrained" else "random_init_finetune"
        for metric in ("top1", "top5"):
            values = [results[(s, init)][metric] for s in seeds]
            key = f"{prefix}_{metric}"
            if len(seeds) == 1:
                out[key] = values[0]
                continue
            mean, std = mean_std(values)
            out.update({key: mean, f"{key}_mean": mean, f"{key}_std": std, f"{key}_per_seed": values})
    return out


def pretrain_probe(checkpoint: Path) -> dict:
    """The pre-training run's offline probe results (its summary.json next to ``checkpoints/``), if present."""
    summary = Path(checkpoint).expanduser().resolve().parent.parent / "summary.json"
    if not summary.is_file():
        return {}
    data = json.loads(summary.read_text())
    return {f"pretrain_{k}": data[k] for k in ("linear_probe_top1", "knn_top1") if k in data}


def run(cfg: DictConfig) -> dict:
    if not cfg.checkpoint:
        raise ConfigError("checkpoint: not set; usage: ssl-vision-finetune checkpoint=<run dir>/checkpoints/last.ckpt")
    check_finetune_config(cfg.finetune)
    ckpt = load_checkpoint(cfg.checkpoint)
    train_cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    out = run_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in cfg.finetune.seeds] if cfg.finetune.get("seeds") else [int(cfg.seed)]
    inits = ["pretrained", "random"] if cfg.finetune.get("random_init") else ["pretrained"]
    results, dirs = {}, {}
    for seed in seeds:
        for init in inits:
            where = out / (f"seed{seed}" if len(seeds) > 1 else "") / ("random_init" if init == "random" else "")
            dirs[(seed, init)] = where
            results[(seed, init)] = finetune_one(cfg, train_cfg, ckpt, seed, init, where)
    first = results[(seeds[0], "pretrained")]
    data = probe_data_config(train_cfg, cfg.get("data"))
    summary = {"checkpoint": str(cfg.checkpoint), "method": str(train_cfg.method.name),
               "backbone": str(train_cfg.backbone.name), "data": str(data.name),
               "protocol": str(cfg.finetune.get("name", "")), "seeds": seeds,
               **{k: first[k] for k in ("epochs", "steps", "world_size", "global_batch_size", "lr")}}
    summary.update(summarize(results, seeds, inits))
    summary.update(pretrain_probe(cfg.checkpoint))
    summary["max_top1"] = first.get("max_top1")
    summary["train_seconds"] = round(sum(r["train_seconds"] for r in results.values()), 2)
    summary["runs"] = {str(dirs[k].relative_to(out)) or ".": results[k] for k in results}
    if "export" in first:
        summary["export"] = first["export"]
    if rank_zero_only.rank > 0:  # files: rank 0 only
        return summary
    if cfg.get("plots", True) and len(results) > 1:
        summary["plots"] = write_curves(out / CURVES, [(f"{i} seed {s}", dirs[(s, i)] / "metrics.csv")
                                                       for (s, i) in results])
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return summary


def _continue(cfg) -> str:
    return continue_command(run_dir_of(cfg), module="ssl_vision.finetune")


main = entry_point("finetune", run, argv=launch_overrides, guard=lambda cfg: preemption.SignalGuard(_continue(cfg)))
