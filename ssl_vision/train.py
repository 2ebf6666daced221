"""``ssl-vision-train``: pre-train, probe and summarize one run (Hydra entry point)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, check_overrides, conf_dir
from .data import SSLDataModule
from .evaluation import evaluate_backbone
from .methods import build_method

log = logging.getLogger("ssl_vision")


def run_dir_of(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/run")


def build_trainer(cfg: DictConfig, out: Path) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)
    return L.Trainer(**kwargs, default_root_dir=str(out), logger=CSVLogger(str(out), name="", version=""),
                     callbacks=[checkpoint])


def run(cfg: DictConfig) -> dict:
    """Pre-train with ``cfg``, evaluate the backbone, write ``summary.json``; return the summary."""
    out = run_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = SSLDataModule(cfg.data)
    dm.setup()
    model = build_method(cfg, dm.num_classes)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    summary: dict = {
        "method": cfg.method.name, "backbone": cfg.backbone.name, "data": cfg.data.name,
        "image_size": int(cfg.data.image_size), "batch_size": int(cfg.data.batch_size),
        "epochs": int(cfg.trainer.max_epochs),
    }
    evaluate = bool(cfg.eval.enabled) and dm.num_classes > 0
    if evaluate and cfg.eval.random_init_baseline:
        base = evaluate_backbone(model.backbone, dm, model.eval_transform, cfg.eval)
        summary["random_init_linear_probe_top1"] = base["linear_probe_top1"]
        summary["random_init_knn_top1"] = base["knn_top1"]
        log.info("random-init backbone: linear top-1 %.4f, kNN top-1 %.4f", base["linear_probe_top1"], base["knn_top1"])

    trainer = build_trainer(cfg, out)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    summary["train_seconds"] = round(time.perf_counter() - start, 2)
    summary["steps"] = int(trainer.global_step)
    probe_acc = trainer.callback_metrics.get("val/probe_top1")
    summary["online_probe_top1"] = float(probe_acc) if probe_acc is not None else None
    if trainer.is_global_zero:
        summary["checkpoint"] = str(out / "checkpoints" / "last.ckpt")
    if evaluate:
        device = model.device
        summary.update(evaluate_backbone(model.backbone, dm, model.eval_transform, cfg.eval, device))
    elif dm.num_classes == 0:
        log.warning("the data has no labels: linear probe and kNN were skipped")
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    return summary


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    try:
        check_overrides(sys.argv[1:], "train")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
