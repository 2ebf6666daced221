"""The LightningDataModule: the pre-training loader and the labelled probe / validation loaders."""

from __future__ import annotations

import logging
import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError
from .datasets import ImageSubset, SkipUnreadable, file_datasets
from .formats import BUILDERS, LABEL_SUBSET_DATA, LABEL_SUBSETS, imagenet_subset, label_subset_indexes, stratified_split
from .resume import EpochPosition, RecordedSeedSampler, ResumableLoader, train_batches_done

log = logging.getLogger("ssl_vision.data")


MAX_AUTO_WORKERS = 8  # decoding workers per process; more rarely helps one GPU and multiplies under DDP


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a SLURM or container limit), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def loader_workers(value) -> int:
    """``data.num_workers``: an integer >= 0, or ``auto``: one fewer than this process's CPUs (one is the
    training process's own), at most ``MAX_AUTO_WORKERS``; 0 on a single CPU."""
    if value == "auto":
        return max(0, min(MAX_AUTO_WORKERS, available_cpus() - 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.num_workers: must be an integer >= 0 or auto, got {value!r}")
    return value


class SSLDataModule(L.LightningDataModule):
    """Pre-training loader (shuffled, drop_last) plus labelled probe-train and validation sets.

    ``data.label_fraction`` (e.g. 0.01 or 0.1) keeps a stratified, seeded fraction of the labels for
    the probes (semi-supervised protocol); ``data.label_subset`` (``1percent`` / ``10percent``, ImageNet
    only) keeps exactly the files of SimCLR's published lists instead. Pre-training still sees every
    image, and the online probe only the kept labels. Unlabelled data (``data.labels=false``) has
    ``num_classes == 0`` and no validation loader.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.name not in BUILDERS:
            raise ConfigError(f"data.name: unknown dataset '{cfg.name}'; choose one of: {', '.join(BUILDERS)}")
        self.pretrain_set = self.probe_train_set = self.val_set = None
        self.class_names: list[str] = []
        self.position = EpochPosition(lambda: self.trainer.current_epoch if self.trainer is not None else 0)

    def setup(self, stage=None):
        if self.pretrain_set is not None:
            return
        canvas, size = int(self.cfg.canvas_size), int(self.cfg.image_size)
        if canvas < size:
            raise ConfigError(f"data.canvas_size: {canvas} is smaller than data.image_size {size}, so every view would be "
                              f"enlarged from a shrunken image; use data.canvas_size={size} or more")
        fraction = float(self.cfg.get("eval_crop_fraction", 1.0))
        if not 0 < fraction <= 1:
            raise ConfigError(f"data.eval_crop_fraction: {fraction} is not in (0, 1]; e.g. 0.875 (ImageNet) or 1.0")
        self.pretrain_set, self.probe_train_set, self.val_set, self.class_names = BUILDERS[self.cfg.name](self.cfg)
        self._select_labels()
        n, bs = len(self.pretrain_set), self.cfg.batch_size
        if bs > n:
            raise ConfigError(
                f"data.batch_size: {bs} is larger than the training set ({n} images); use at most {n}"
            )

    def _select_labels(self) -> None:
        fraction, subset = self.cfg.get("label_fraction"), self.cfg.get("label_subset")
        if fraction is not None and subset is not None:
            raise ConfigError(f"data.label_subset: set together with data.label_fraction={fraction}; use one (label_subset: "
                              "the published ImageNet lists, label_fraction: a stratified random fraction)")
        if subset is not None:
            self._apply_label_subset(str(subset))
        else:
            self._apply_label_fraction()

    def _apply_label_fraction(self) -> None:
        fraction = self.cfg.get("label_fraction")
        if fraction is None:
            return
        fraction = float(fraction)
        if not 0 < fraction <= 1:
            raise ConfigError(f"data.label_fraction: {fraction} is not in (0, 1]; e.g. 0.01 or 0.1 (null: all labels)")
        if self.num_classes == 0:
            raise ConfigError("data.label_fraction: the data has no labels (data.labels=false); leave it null")
        if fraction == 1:
            return
        labels = self.probe_train_set.labels.numpy()
        known = np.flatnonzero(labels >= 0)
        _, held = stratified_split(labels[known], fraction, int(self.cfg.seed))
        keep = known[held]
        self._keep_labels(keep)
        log.info("data.label_fraction=%g: the probes use %d of %d labelled images (stratified, seed %d)",
                 fraction, len(keep), len(known), int(self.cfg.seed))

    def _apply_label_subset(self, name: str) -> None:
        """SimCLR's published semi-supervised lists (``formats.imagenet_subset``): the probes (and through
        ``probe_train_set`` fine-tuning) see exactly the listed training files of the data's classes."""
        if name not in LABEL_SUBSETS:
            raise ConfigError(f"data.label_subset: unknown subset '{name}'; choose one of: {', '.join(LABEL_SUBSETS)} "
                              "(null: all labels)")
        if self.cfg.name not in LABEL_SUBSET_DATA:
            raise ConfigError(f"data.label_subset: the published subsets list ImageNet-1k files, for data="
                              f"{' or '.join(LABEL_SUBSET_DATA)}, not '{self.cfg.name}'; use data.label_fraction instead")
        keep, missing, listed = label_subset_indexes(self.probe_train_set, self.class_names, imagenet_subset(name))
        train = f"{self.cfg.path}/train"
        if listed == 0:
            raise ConfigError(f"data.label_subset: none of the files listed in {name} belongs to the {self.num_classes} "
                              f"classes under '{train}'; expected ImageNet wnid folders (train/n01440764/...)")
        if missing:
            raise ConfigError(f"data.label_subset: {len(missing)} of the {listed} files listed in {name} for the "
                              f"{self.num_classes} classes under '{train}' are missing (e.g. {missing[0]} in "
                              f"{missing[0].split('_')[0]}/); the subset needs the complete ImageNet training set")
        if self.cfg.name == "imagenet" and self.num_classes != 1000:
            log.warning("data.label_subset=%s: '%s' holds %d classes, not ImageNet-1k's 1000; the probes use the "
                        "listed files of those classes only", name, train, self.num_classes)
        self._keep_labels(keep)
        log.info("data.label_subset=%s: the probes use the %d listed images of %d (SimCLR's published list)",
                 name, len(keep), int((self.probe_train_set.base.labels >= 0).sum()))

    def _keep_labels(self, keep: np.ndarray) -> None:
        """The probes train on the samples ``keep`` of the probe-train set only; pre-training keeps every image,
        and where it shares that set the others lose their labels (the online probe sees the kept ones only)."""
        probe = self.probe_train_set
        self.probe_train_set = ImageSubset(probe, keep)
        if self.pretrain_set is probe:
            masked = torch.full_like(probe.labels, -1)
            masked[keep] = probe.labels[keep]
            self.pretrain_set = ImageSubset(probe, labels=masked)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _loader(self, dataset, shuffle: bool, drop_last: bool, batch_size=None, refill: bool = False,
                loader=DataLoader, **kwargs):
        workers = loader_workers(self.cfg.get("num_workers", 0))
        # persistent workers take their base seed once, at the first iterator; from a private generator,
        # that draw stays off the global random stream, which a resumed run then continues exactly
        generator = torch.Generator().manual_seed(int(self.cfg.seed)) if workers > 0 else None
        return loader(
            dataset,
            batch_size=batch_size or self.cfg.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=SkipUnreadable(self.cfg.canvas_size, refill),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            generator=generator,
            **kwargs,
        )

    def train_dataloader(self):
        """Shuffled, drop_last; resumable mid-epoch (``ResumableLoader``)."""
        return self._loader(self.pretrain_set, shuffle=False, drop_last=True, refill=True, loader=ResumableLoader,
                            sampler=RecordedSeedSampler(self.pretrain_set, self.position), position=self.position)

    # --- where training stands in its epoch: saved in every checkpoint -----------------------------------
    # Lightning restores a datamodule's state before it builds the first training iterator (it builds
    # one early, for ``estimated_stepping_batches``), which a loader's own state_dict would miss.
    def state_dict(self):
        if self.trainer is None:
            return {}
        done = train_batches_done(self.trainer)
        return {"train_epoch": int(self.trainer.current_epoch), "train_batches_done": done,
                "train_seed": self.position.seed if done else None}

    def load_state_dict(self, state):
        """A checkpoint taken part-way through an epoch: that epoch is replayed in the same order (same
        seed; under DDP, same seed + epoch) from the first batch not yet trained on."""
        done = int(state.get("train_batches_done", 0))
        self.position.resume_epoch = int(state["train_epoch"]) if done else None
        self.position.resume_batches = done
        self.position.resume_seed = state.get("train_seed")

    def val_dataloader(self):
        if self.val_set is None:  # unlabelled data: nothing to validate the online probe on
            return []
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def probe_dataloaders(self, batch_size=None):
        """(probe-train, validation) loaders in a fixed order, for offline evaluation."""
        if self.probe_train_set is None or self.val_set is None:
            raise ConfigError(f"data: '{self.cfg.name}' has no labels (data.labels=false), so there is nothing to probe")
        return (
            self._loader(self.probe_train_set, shuffle=False, drop_last=False, batch_size=batch_size),
            self._loader(self.val_set, shuffle=False, drop_last=False, batch_size=batch_size),
        )

    # --- unreadable files -------------------------------------------------------------------------
    def take_skipped(self) -> int:
        """Unreadable files skipped (over all sets and workers of this process) since the last call."""
        sets = [self.pretrain_set, self.probe_train_set, self.val_set]
        files = {id(f): f for s in sets if s is not None for f in file_datasets(s)}
        return sum(f.take_skipped() for f in files.values())

    def report_skipped(self, when: str = "this epoch") -> int:
        """Log ``skipped N unreadable files <when>`` if any were skipped since the last call."""
        n = self.take_skipped()
        if n:
            log.warning("skipped %d unreadable files %s", n, when)
        return n


class SkippedFilesReport(L.Callback):
    """Logs ``skipped N unreadable files this epoch`` (summed over ranks and workers) after every
    training epoch, validation included. Add it to the Trainer: ``callbacks=[SkippedFilesReport()]``;
    it reads ``trainer.datamodule`` (an ``SSLDataModule``) and does nothing otherwise."""

    @staticmethod
    def _count(trainer, pl_module) -> int:
        dm = getattr(trainer, "datamodule", None)
        n = dm.take_skipped() if isinstance(dm, SSLDataModule) else 0
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(torch.tensor(float(n), device=pl_module.device), reduce_op="sum")
            n = int(round(float(total)))
        return n

    def _report(self, trainer, pl_module, when: str) -> None:
        n = self._count(trainer, pl_module)
        if n and trainer.is_global_zero:
            log.warning("skipped %d unreadable files %s", n, when)

    def on_train_start(self, trainer, pl_module):
        self._report(trainer, pl_module, "before training")  # e.g. a random-init baseline probe

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, f"this epoch (epoch {trainer.current_epoch})")
