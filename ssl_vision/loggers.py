"""The ``logger`` config group -> Lightning loggers, and their run ids kept in every checkpoint.

Each option of ``conf/logger/`` is one entry ``<name>: {_target_: <Lightning logger>, ...}``; several may be
chosen at once (``logger=[csv,tensorboard]``, or ``+logger=wandb`` on top of the default ``csv``). Where an
entry leaves ``save_dir`` null, the logger writes into the run directory (``MLFlowLogger``: its ``mlruns``).

Resuming: ``RunCSVLogger`` keeps metrics.csv's rows up to the checkpoint's step; a logger with a run id of
its own (W&B, MLflow) has it saved in the checkpoint (``LoggerRunIds``) and gets it back on resume, so the
resumed run continues the same W&B / MLflow run instead of starting a new one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from .callbacks import RunCSVLogger, _one_line
from .config import ConfigError

#: logger class -> (packages, any of which it needs; the pip extra that installs one)
PACKAGES: dict[type, tuple[tuple[str, ...], str]] = {
    TensorBoardLogger: (("tensorboard", "tensorboardX"), "tensorboard"),
    WandbLogger: (("wandb",), "wandb"),
    MLFlowLogger: (("mlflow",), "mlflow"),
}
#: logger class -> (its attribute holding the run id, the constructor argument that continues that run)
RUN_IDS: dict[type, tuple[str, str]] = {WandbLogger: ("version", "id"), MLFlowLogger: ("run_id", "run_id")}
CHECKPOINT_KEY = "logger_run_ids"


def _target_class(name: str, target: str) -> type:
    from .methods import import_object

    try:
        return import_object(str(target))
    except Exception as e:  # noqa: BLE001 - any import failure is one line naming the setting
        raise ConfigError(f"logger.{name}: cannot import '{target}' ({type(e).__name__}: {e})") from None


def _check_packages(name: str, cls: type) -> None:
    for klass, (packages, extra) in PACKAGES.items():
        if issubclass(cls, klass) and not any(importlib.util.find_spec(p) for p in packages):
            raise ConfigError(f"logger.{name}: {cls.__name__} needs the '{packages[0]}' package, which is not "
                              f'installed; pip install "ssl-vision[{extra}]"')


def stored_run_ids(ckpt_path) -> dict:
    """The loggers' run ids saved in the checkpoint at ``ckpt_path`` ({} if none or unreadable)."""
    import torch

    try:  # memory-mapped: only the small dict is read, not the weights
        ckpt = torch.load(str(ckpt_path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - resume_point has already reported an unreadable checkpoint
        return {}
    return dict(ckpt.get(CHECKPOINT_KEY) or {})


def build_loggers(lcfg, out: Path, resume_step: int | None = None, ckpt_path=None) -> dict[str, Logger]:
    """{name: logger} for the ``logger`` config mapping ``lcfg`` (entries in config order; null ones skipped).

    ``save_dir: null`` -> the run directory ``out``; ``RunCSVLogger`` gets ``resume_step``; W&B and MLflow
    loggers without an id of their own get the one the checkpoint ``ckpt_path`` holds."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    entries = {name: node for name, node in (lcfg or {}).items() if node is not None}
    classes = {}
    for name, node in entries.items():
        if not isinstance(node, (DictConfig, dict)) or "_target_" not in node:
            raise ConfigError(f"logger.{name}: needs a _target_ (a Lightning logger class); the options are in "
                              "conf/logger/, e.g. logger=[csv,tensorboard]")
        classes[name] = cls = _target_class(name, node["_target_"])
        if not (isinstance(cls, type) and issubclass(cls, Logger)):
            raise ConfigError(f"logger.{name}: {node['_target_']} is not a Lightning logger")
        _check_packages(name, cls)
    ids = stored_run_ids(ckpt_path) if ckpt_path and any(
        issubclass(c, tuple(RUN_IDS)) for c in classes.values()) else {}
    loggers = {}
    for name, node in entries.items():
        cls, kwargs = classes[name], {}
        if node.get("save_dir", "unset") is None:
            kwargs["save_dir"] = str(out / "mlruns") if issubclass(cls, MLFlowLogger) else str(out)
        if issubclass(cls, RunCSVLogger):
            kwargs["resume_step"] = resume_step
        for klass, (_, arg) in RUN_IDS.items():
            if issubclass(cls, klass) and not node.get(arg) and ids.get(name):
                kwargs[arg] = ids[name]
        try:
            loggers[name] = instantiate(node, **kwargs)
        except InstantiationException as e:
            raise ConfigError(f"logger.{name}: {_one_line(e)}") from None
    return loggers


class LoggerRunIds(L.Callback):
    """Saves the run id of each W&B / MLflow logger in every checkpoint (``checkpoint['logger_run_ids']``,
    ``{config name: id}``), where ``build_loggers`` finds it when the run is resumed."""

    def __init__(self, loggers: dict[str, Logger]):
        self.loggers = {name: lg for name, lg in loggers.items() if isinstance(lg, tuple(RUN_IDS))}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not self.loggers or not trainer.is_global_zero:  # rank 0 writes the file
            return
        ids = {}
        for name, lg in self.loggers.items():
            attr = next(a for klass, (a, _) in RUN_IDS.items() if isinstance(lg, klass))
            run_id = getattr(lg, attr, None)
            if run_id:
                ids[name] = str(run_id)
        checkpoint[CHECKPOINT_KEY] = ids
