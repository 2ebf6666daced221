"""Trainer callbacks and the run's metrics log: crash-safe, versioned checkpoints, throughput, metrics.csv.

``AtomicCheckpointIO`` writes every checkpoint to a temporary file and renames it into place, so
``last.ckpt`` is never truncated by a kill, and keeps the previous ones as ``last-1.ckpt``, ... (the
rename is the last step, so a second signal or a crash during a save leaves the old files intact).
``LastCheckpoint`` saves it every N optimizer steps and at each epoch end (never after a failure, so
the last *good* state is what stays on disk), plus an optional permanent copy every N epochs; a
write that fails (e.g. a full disk) stops the run on every rank, with the previous files intact.
``RunCSVLogger`` writes ``<run dir>/metrics.csv`` and, in a resumed run, continues it.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import shutil
import time
import zipfile
from io import StringIO
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("ssl_vision")


def check_checkpoint_config(ckpt) -> dict:
    """``checkpoint.*`` as ints, or a one-line ``ConfigError`` naming the setting."""
    from .config import ConfigError

    out = {}
    for key, low, default in (("every_n_steps", 0, 0), ("every_n_epochs", 0, 0), ("keep_last", 1, 2)):
        value = ckpt.get(key, default)
        value = 0 if value is None and low == 0 else value
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"checkpoint.{key}: must be an integer >= {low}, got {value}"
                              + (" (0: off)" if low == 0 else " (1: last.ckpt only; 2: also the one before it)"))
        out[key] = value
    return out


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the file, the step, the cause and what was kept."""


def versions(path: Path) -> list[Path]:
    """``path`` (``last.ckpt``) and its older versions ``last-1.ckpt``, ``last-2.ckpt``, ... that exist,
    newest first: the order a resume tries them in."""
    path = Path(path)
    pattern = re.compile(rf"{re.escape(path.stem)}-(\d+){re.escape(path.suffix)}")
    older = sorted((int(m.group(1)), p) for p in path.parent.glob(f"{path.stem}-*{path.suffix}")
                   if (m := pattern.fullmatch(p.name)))
    return [p for p in [path] if p.is_file()] + [p for _, p in older]


def _version(path: Path, n: int) -> Path:
    return path.with_name(f"{path.stem}-{n}{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a file system without directory handles: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno and e.strerror else str(e)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link where the file system has them: no second write),
    put in place by a rename, so a half-made ``dst`` never exists."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically, with ``keep_last`` versions of each file.

    A save writes ``.<name>.tmp-<pid>`` and fsyncs it; only then does ``last.ckpt`` become ``last-1.ckpt``
    (``last-1`` becomes ``last-2``, ... up to ``keep_last - 1``; by hard link, so ``last.ckpt`` exists
    throughout), and the new file is renamed to ``last.ckpt``. A kill at any moment leaves complete files.

    Lightning calls ``save_checkpoint`` on global rank 0 only, and every rank then meets in a barrier. A
    failed write (``OSError``, e.g. ENOSPC) therefore is not raised here, where it would leave the other
    ranks waiting in that barrier: it deletes the partial file, leaves the old ones untouched, and is kept
    in ``error`` for ``LastCheckpoint`` to report on every rank."""

    def __init__(self, keep_last: int = 1):
        super().__init__()
        self.keep_last = max(1, int(keep_last))
        self.error: str | None = None

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            self._rotate(path)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.error = _describe(e)

    def _rotate(self, path: Path) -> None:
        """Shift ``path`` to ``<stem>-1``, ``<stem>-1`` to ``<stem>-2``, ... keeping ``keep_last`` files in all."""
        if self.keep_last < 2 or not path.is_file():
            return
        if not zipfile.is_zipfile(path):  # truncated (e.g. by an older version); never let it push out a good one
            log.warning("checkpoint %s is not a complete checkpoint file: it is replaced, %s is kept",
                        path, _version(path, 1))
            return
        for n in range(self.keep_last - 1, 1, -1):
            if _version(path, n - 1).is_file():
                os.replace(_version(path, n - 1), _version(path, n))
        _link_or_copy(path, _version(path, 1))

    def keep_copy(self, path, name: str) -> None:
        """A permanent copy of the checkpoint ``path`` next to it, as ``name``; a failure is kept in ``error``."""
        path = Path(path)
        try:
            _link_or_copy(path, path.with_name(name))
        except OSError as e:
            self.error = _describe(e)

    def take_error(self) -> str | None:
        error, self.error = self.error, None
        return error


class LastCheckpoint(L.Callback):
    """Keep ``<dirpath>/last.ckpt`` current: every ``every_n_steps`` steps (0: off) and per epoch, and every
    ``every_n_epochs`` epochs (0: off) a permanent copy ``epoch-<N>.ckpt`` (N epochs done).

    ``save`` is also what a stop on a signal uses (``ssl_vision.preemption``). It is called on every rank
    (Lightning's save gathers state from all of them); a write that failed on rank 0 raises
    ``CheckpointWriteError`` on every rank at the same point, naming the step and the file that was kept."""

    def __init__(self, dirpath, every_n_steps: int = 0, every_n_epochs: int = 0, io: AtomicCheckpointIO | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = int(every_n_steps or 0)
        self.every_n_epochs = int(every_n_epochs or 0)
        self.io = io
        self._saved_step = -1
        self._written_step: int | None = None  # the step of the last.ckpt this process wrote

    def save(self, trainer, permanent: str | None = None) -> None:
        """Save ``last.ckpt`` at the current step (once per step), and a permanent copy named ``permanent``."""
        fresh = trainer.global_step != self._saved_step
        if trainer.sanity_checking or not (fresh or permanent):
            return
        if fresh:
            bad = [n for n, p in trainer.lightning_module.named_parameters() if not torch.isfinite(p).all()]
            if bad:  # never replace the last good checkpoint with a broken state
                raise FloatingPointError(f"non-finite weights after step {trainer.global_step} (e.g. {bad[0]})")
            for logger in trainer.loggers:  # the metrics up to this step are on disk with the checkpoint
                logger.save()
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
        error = None
        if self.io is not None and trainer.is_global_zero:
            where, error = self.path, self.io.take_error() if fresh else None
            if error is None and permanent:
                where = self.path.with_name(permanent)
                self.io.keep_copy(self.path, permanent)
                error = self.io.take_error()
            if error is not None:
                if where != self.path:
                    kept = f"{self.path} (step {trainer.global_step}) is intact"
                elif self._written_step is not None:
                    kept = f"the previous checkpoint {self.path} (step {self._written_step}) is intact"
                elif self.path.is_file():
                    kept = f"the previous checkpoint {self.path} is intact"
                else:
                    kept = "no checkpoint was written before"
                error = f"could not write checkpoint {where} at step {trainer.global_step}: {error}; {kept}"
        if trainer.world_size > 1:  # one decision for every rank: all stop here, or none
            error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise CheckpointWriteError(error)
        if fresh:
            self._saved_step = self._written_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        done = trainer.current_epoch + 1
        permanent = f"epoch-{done:04d}.ckpt" if self.every_n_epochs and done % self.every_n_epochs == 0 else None
        self.save(trainer, permanent)

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


def _write_rows(path: Path, header: list[str], rows: list[dict]) -> None:
    """``path`` as a CSV of ``rows``, written to a temporary file and renamed: a kill leaves the old file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class _AtomicWriter(ExperimentWriter):
    """Lightning's CSV writer, except that when new columns appear it rewrites metrics.csv under a new
    header by a rename, not in place (truncate, then write: a kill in between lost every row)."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        _write_rows(path, fieldnames, rows)


class _ContinuedWriter(_AtomicWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run keeps its rows up to the
    checkpoint's step (later ones are trained again) and appends to them. A last row cut short by a kill
    (rows end with a line break) is dropped."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            text = f.read()
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        reader = csv.DictReader(StringIO(complete, newline=""))
        header, rows = list(reader.fieldnames or []), [r for r in reader if _step(r) < self.resume_step]
        _write_rows(path, header, rows)
        self.metrics_keys = header  # new keys extend it (Lightning rewrites the file with the union)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class RunCSVLogger(CSVLogger):
    """``<save_dir>/metrics.csv``, crash-safe (``_AtomicWriter``); with ``resume_step``, the rows of the
    interrupted run up to that step are kept and the resumed run appends to them."""

    def __init__(self, save_dir: str, resume_step: int | None = None):
        super().__init__(save_dir, name="", version="")
        self.resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = (_AtomicWriter(self.log_dir) if self.resume_step is None
                                else _ContinuedWriter(self.log_dir, self.resume_step))
        return super().experiment  # rank > 0: Lightning's dummy
