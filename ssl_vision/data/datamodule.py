"""The LightningDataModule: the pre-training loader and the labelled probe / validation loaders."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError
from .datasets import ImageSubset, SkipUnreadable, file_datasets
from .formats import BUILDERS, stratified_split
from .resume import EpochPosition, RecordedSeedSampler, ResumableLoader, train_batches_done

log = logging.getLogger("ssl_vision.data")


class SSLDataModule(L.LightningDataModule):
    """Pre-training loader (shuffled, drop_last) plus labelled probe-train and validation sets.

    ``data.label_fraction`` (e.g. 0.01 or 0.1) keeps a stratified, seeded fraction of the labels for
    the probes (semi-supervised protocol); pre-training still sees every image, and the online probe
    only the kept labels. Unlabelled data (``data.labels=false``) has ``num_classes == 0`` and no
    validation loader.
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
        self._apply_label_fraction()
        n, bs = len(self.pretrain_set), self.cfg.batch_size
        if bs > n:
            raise ConfigError(
                f"data.batch_size: {bs} is larger than the training set ({n} images); use at most {n}"
            )

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
        probe = self.probe_train_set
        self.probe_train_set = ImageSubset(probe, keep)
        if self.pretrain_set is probe:  # the online probe sees only the kept labels too
            masked = torch.full_like(probe.labels, -1)
            masked[keep] = probe.labels[keep]
            self.pretrain_set = ImageSubset(probe, labels=masked)
        log.info("data.label_fraction=%g: the probes use %d of %d labelled images (stratified, seed %d)",
                 fraction, len(keep), len(known), int(self.cfg.seed))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _loader(self, dataset, shuffle: bool, drop_last: bool, batch_size=None, refill: bool = False,
                loader=DataLoader, **kwargs):
        workers = int(self.cfg.num_workers)
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
