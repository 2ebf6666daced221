"""``ssl-vision-probe checkpoint=PATH [data=...]``: linear probe + kNN of a saved run's backbone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from .augment import EvalTransform
from .cli import entry_point
from .config import ConfigError
from .data import SSLDataModule
from .evaluation import backbone_from_checkpoint, evaluate_backbone, load_checkpoint


def probe_data_config(train_cfg: DictConfig, override: DictConfig | None) -> DictConfig:
    """The checkpoint's own data config, or ``override`` set to the trained image size."""
    if override is None:
        return train_cfg.data
    data = OmegaConf.create(OmegaConf.to_container(override, resolve=True))
    size = int(train_cfg.data.image_size)
    with open_dict(data):
        data.canvas_size = max(size, round(int(data.canvas_size) * size / int(data.image_size)))
        data.image_size = size
    return data


def probe_eval_config(train_cfg: DictConfig, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """On the run's own data, the evaluation settings the run itself used (so the probe reproduces its
    numbers) with the ``eval.*`` keys of the command line ``overrides`` on top; on other data
    (``data=...`` given), or with a protocol named on the command line (``eval=mae_linprobe``),
    ``cfg.eval``: that conf/eval option with the command line applied."""
    named = any(o.lstrip("+").startswith("eval=") for o in overrides)
    if cfg.get("data") is not None or "eval" not in train_cfg or named:
        return cfg.eval
    given = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith("eval.")]
    return OmegaConf.merge(train_cfg.eval, OmegaConf.from_dotlist(given).get("eval", {}))


def probe(cfg: DictConfig) -> dict:
    if not cfg.checkpoint:
        raise ConfigError("checkpoint: not set; usage: ssl-vision-probe checkpoint=<run dir>/checkpoints/last.ckpt")
    ckpt = load_checkpoint(cfg.checkpoint)
    train_cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    backbone, _ = backbone_from_checkpoint(ckpt)
    dcfg = probe_data_config(train_cfg, cfg.get("data"))
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    ecfg = probe_eval_config(train_cfg, cfg, overrides)
    dm = SSLDataModule(dcfg)
    dm.setup()
    if dm.num_classes == 0:
        raise ConfigError(f"data: '{dcfg.name}' has no labels, so there is nothing to probe; choose labelled data")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transform = EvalTransform(int(dcfg.image_size), list(train_cfg.data.mean), list(train_cfg.data.std),
                              float(dcfg.get("eval_crop_fraction", 1.0)))
    result = {"checkpoint": str(cfg.checkpoint), "method": train_cfg.method.name,
              "backbone": train_cfg.backbone.name, "data": dcfg.name}
    result.update(evaluate_backbone(backbone.to(device), dm, transform, ecfg, device))
    out = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    if out is not None:
        (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


main = entry_point("probe", probe)

if __name__ == "__main__":
    main()
