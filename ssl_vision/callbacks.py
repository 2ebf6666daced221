"""Trainer callbacks and the run's metrics log: crash-safe checkpoints, throughput, metrics.csv.

``AtomicCheckpointIO`` writes every checkpoint to a temporary file and renames it into place, so
``last.ckpt`` is never truncated by a kill. ``LastCheckpoint`` saves it every N optimizer steps
and at each epoch end (never after a failure, so the last *good* state is what stays on disk).
``RunCSVLogger`` writes ``<run dir>/metrics.csv`` and, in a resumed run, continues it.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


class LastCheckpoint(L.Callback):
    """Keep ``<dirpath>/last.ckpt`` current: every ``every_n_steps`` steps (0: off) and per epoch."""

    def __init__(self, dirpath, every_n_steps: int = 0):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = int(every_n_steps or 0)
        self._saved_step = -1

    def _save(self, trainer):
        if trainer.global_step != self._saved_step and not trainer.sanity_checking:
            bad = [n for n, p in trainer.lightning_module.named_parameters() if not torch.isfinite(p).all()]
            if bad:  # never replace the last good checkpoint with a broken state
                raise FloatingPointError(f"non-finite weights after step {trainer.global_step} (e.g. {bad[0]})")
            for logger in trainer.loggers:  # the metrics up to this step are on disk with the checkpoint
                logger.save()
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer)

    def state_dict(self):
        return {"saved_step": self._saved_step}

    def load_state_dict(self, state):
        self._saved_step = state.get("saved_step", -1)


class Throughput(L.Callback):
    """Logs ``train/images_per_second`` (all ranks together) for every epoch."""

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self._t0 = self._t1 = None
        self._n = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:  # resumed part-way through an epoch: Lightning skips on_train_epoch_start
            self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += len(batch[1]) * trainer.world_size
        self._t1 = time.perf_counter()  # the epoch's clock stops at its last training batch

    def on_train_epoch_end(self, trainer, pl_module):
        t0, self._t0 = self._t0, None
        if not self._n or t0 is None:
            return
        dt = self._t1 - t0
        self.images += self._n
        self.seconds += dt
        pl_module.log("train/images_per_second", self._n / max(dt, 1e-9), on_epoch=True, rank_zero_only=True)

    @property
    def images_per_second(self) -> float | None:
        return round(self.images / self.seconds, 2) if self.seconds else None


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run keeps its rows up to the
    checkpoint's step (later ones are trained again) and appends to them."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), [r for r in reader if _step(r) < self.resume_step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = header  # new keys extend it (Lightning rewrites the file with the union)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class RunCSVLogger(CSVLogger):
    """``<save_dir>/metrics.csv``; with ``resume_step``, the rows of the interrupted run up to that step
    are kept and the resumed run appends to them."""

    def __init__(self, save_dir: str, resume_step: int | None = None):
        super().__init__(save_dir, name="", version="")
        self.resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is None and self.resume_step is not None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.resume_step)
        return super().experiment  # rank > 0: Lightning's dummy
