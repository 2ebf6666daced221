"""Trainer callbacks: crash-safe checkpoints and throughput.

``AtomicCheckpointIO`` writes every checkpoint to a temporary file and renames it into place, so
``last.ckpt`` is never truncated by a kill. ``LastCheckpoint`` saves it every N optimizer steps
and at each epoch end (never after a failure, so the last *good* state is what stays on disk).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += len(batch[1]) * trainer.world_size
        self._t1 = time.perf_counter()  # the epoch's clock stops at its last training batch

    def on_train_epoch_end(self, trainer, pl_module):
        if not self._n:
            return
        dt = self._t1 - self._t0
        self.images += self._n
        self.seconds += dt
        pl_module.log("train/images_per_second", self._n / max(dt, 1e-9), on_epoch=True, rank_zero_only=True)

    @property
    def images_per_second(self) -> float | None:
        return round(self.images / self.seconds, 2) if self.seconds else None
