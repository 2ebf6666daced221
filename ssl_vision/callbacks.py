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
import math
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


# Dense peak tensor-core FLOP/s of one GPU (no structured sparsity; the data sheets' headline figures are
# twice these), by the dtype its matmuls and convolutions run in. NVIDIA data sheets: H100 (SXM5, PCIe) and
# H200 (SXM; GH200's GPU is the same) https://resources.nvidia.com/en-us-tensor-core ,
# https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446 ; A100 (SXM4 and PCIe alike)
# https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
# Other devices (CPUs, NVL boards, consumer GPUs): no MFU rather than a guess.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100_sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100_pcie": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def peak_chip(device_name: str) -> str | None:
    """The ``PEAK_FLOPS`` row of a GPU named as ``torch.cuda.get_device_name`` names it, or None."""
    n = device_name.lower()
    if "nvl" in n:  # H100 / H200 NVL: lower clocks than the SXM parts; not in the table
        return None
    if "h200" in n:  # "NVIDIA H200", "NVIDIA GH200 480GB"
        return "h200"
    if "h100" in n:  # "NVIDIA H100 80GB HBM3" is the SXM part
        return "h100_pcie" if "pcie" in n else "h100_sxm" if ("hbm3" in n or "sxm" in n) else None
    if "a100" in n:
        return "a100"
    return None


def compute_dtype(precision: str) -> str | None:
    """The dtype matmuls run in under Lightning's ``precision``: bf16, fp16, tf32 (32-true with TF32 matmuls on,
    ``tf32: true``) or fp32; None for 64-bit."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    if p.startswith("32"):
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str | None]:
    """(peak FLOP/s, dtype) of ``device`` at ``precision``, or (None, dtype) when the device is not in
    ``PEAK_FLOPS``."""
    dtype = compute_dtype(precision)
    if device.type != "cuda" or dtype is None:
        return None, dtype
    chip = peak_chip(torch.cuda.get_device_name(device))
    return (PEAK_FLOPS[chip][dtype] if chip else None), dtype


class Throughput(L.Callback):
    """Training throughput, model FLOPs and MFU.

    - ``train/images_per_second`` (all ranks together) and ``train/images_per_second_per_device``, for every
      epoch, from its first training batch to its last (validation not included).
    - ``flops_per_image``: the FLOPs of one training step per image on one device, counted on the fit's
      first training step with ``torch.utils.flop_counter.FlopCounterMode`` (every matmul, convolution and
      attention of the forward and backward passes, 2 per multiply-add): every view the method trains on,
      its heads, the momentum encoder's forward and the online probe; not the optimizer, EMA update or
      augmentation (no matmuls). That step runs eagerly (``torch.compiler.set_stance("force_eager")``),
      since a compiled region hides its operations from the counter; compilation starts at the next one.
    - ``train/mfu``: model FLOPs utilisation, flops_per_image x images/s per device / the device's dense peak
      FLOP/s at the run's precision (``PEAK_FLOPS``); not logged on devices without a known peak.
    """

    def __init__(self, count_flops: bool = True):
        self.images = 0
        self.seconds = 0.0
        self._t0 = self._t1 = None
        self._n = 0
        self.count_flops = count_flops
        self.flops_per_image: float | None = None
        self.world_size = 1
        self.peak: float | None = None
        self.dtype: str | None = None
        self._counting = None  # (FlopCounterMode, stance) while the first step is counted

    def setup(self, trainer, pl_module, stage):
        self.world_size = trainer.world_size
        self.peak, self.dtype = peak_flops(trainer.strategy.root_device, trainer.precision)

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:  # resumed part-way through an epoch: Lightning skips on_train_epoch_start
            self._t0, self._n = time.perf_counter(), 0
        if self.count_flops and self.flops_per_image is None and self._counting is None:
            from torch.utils.flop_counter import FlopCounterMode

            stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else None
            counter = FlopCounterMode(display=False)
            counter.__enter__()
            self._counting = (counter, stance)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images = len(batch[1])
        if self._counting is not None:
            counter, stance = self._counting
            self._counting = None
            counter.__exit__(None, None, None)
            if stance is not None:
                stance.__exit__(None, None, None)
            if images:  # a batch whose every image was unreadable trains on stand-ins: count the next one
                self.flops_per_image = counter.get_total_flops() / images
                if trainer.is_global_zero:
                    log.info("training step: %.3g GFLOPs per image (forward + backward, counted at step %d)",
                             self.flops_per_image / 1e9, trainer.global_step)
        self._n += images * trainer.world_size
        self._t1 = time.perf_counter()  # the epoch's clock stops at its last training batch

    def on_train_epoch_end(self, trainer, pl_module):
        t0, self._t0 = self._t0, None
        if not self._n or t0 is None:
            return
        dt = max(self._t1 - t0, 1e-9)
        self.images += self._n
        self.seconds += dt
        rate = self._n / dt
        pl_module.log("train/images_per_second", rate, on_epoch=True, rank_zero_only=True)
        pl_module.log("train/images_per_second_per_device", rate / trainer.world_size, on_epoch=True,
                      rank_zero_only=True)
        mfu = self.mfu_of(rate / trainer.world_size)
        if mfu is not None:
            pl_module.log("train/mfu", mfu, on_epoch=True, rank_zero_only=True)

    def mfu_of(self, per_device: float | None) -> float | None:
        if per_device is None or self.peak is None or self.flops_per_image is None:
            return None
        return self.flops_per_image * per_device / self.peak

    @property
    def images_per_second(self) -> float | None:
        return round(self.images / self.seconds, 2) if self.seconds else None

    def summary(self) -> dict:
        """The run's figures for summary.json: images/s in total and per device, FLOPs per image, and where
        the device's peak is known, its peak FLOP/s and the MFU."""
        total = self.images_per_second
        per_device = round(total / self.world_size, 2) if total is not None else None
        out = {"train_images_per_second": total, "train_images_per_second_per_device": per_device,
               "train_devices": self.world_size,
               "flops_per_image": round(self.flops_per_image) if self.flops_per_image is not None else None}
        mfu = self.mfu_of(per_device)
        if mfu is not None:
            out.update(device_peak_flops=self.peak, peak_flops_dtype=self.dtype, mfu=round(mfu, 4))
        return out

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero or self.images_per_second is None:
            return
        s = self.summary()
        flops = f", {s['flops_per_image'] / 1e9:.3g} GFLOPs per image" if s["flops_per_image"] else ""
        mfu = f", MFU {100 * s['mfu']:.1f}% of {s['device_peak_flops'] / 1e12:.0f} TFLOP/s ({s['peak_flops_dtype']})" \
            if "mfu" in s else ""
        log.info("throughput: %.1f images/s (%.1f per device, %d device%s)%s%s", s["train_images_per_second"],
                 s["train_images_per_second_per_device"], s["train_devices"], "s" * (s["train_devices"] > 1), flops, mfu)


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


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class ProgressLog(L.Callback):
    """Progress as plain log lines, for output that is not a terminal (a SLURM log, ``> run.log``), where
    Lightning's progress bar would write carriage-return fragments. Every ``every_n_steps`` optimizer steps
    (``auto``: 5% of the run, at most ``MAX_EVERY`` apart) and at the last step, one line::

        step 120/400 (30%) | epoch 3/10 | loss 4.1253 | 812.4 images/s | elapsed 0:01:02 | ETA 0:02:25

    (images/s: all ranks together, since the previous line; ETA: the remaining steps at the run's mean step
    time so far, validation included), and one per epoch with the epoch's mean loss and the online probe.
    Lines go to the ``ssl_vision`` logger (Hydra: the console and ``<run dir>/train.log``), from rank 0."""

    MAX_EVERY = 500

    def __init__(self, every_n_steps: int | str = "auto"):
        if every_n_steps != "auto" and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                        or every_n_steps < 1):
            from .config import ConfigError

            raise ConfigError(f"progress.every_n_steps: must be an integer >= 1 or auto, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.every = 1
        self.total = 0
        self._start = self._last_time = 0.0
        self._start_step = self._last_step = 0
        self._images = 0

    def on_train_start(self, trainer, pl_module):
        self.total = int(trainer.estimated_stepping_batches)
        self.every = self.every_n_steps if self.every_n_steps != "auto" else \
            max(1, min(self.MAX_EVERY, math.ceil(self.total / 20)))
        self._start = self._last_time = time.perf_counter()
        self._start_step = self._last_step = trainer.global_step  # a resumed run starts part-way
        self._images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._images += len(batch[1]) * trainer.world_size
        step = trainer.global_step
        if step == self._last_step or not (step % self.every == 0 or step >= self.total):
            return
        loss = _number(trainer.callback_metrics.get("train/loss_step"))  # every rank: the same reads
        now = time.perf_counter()
        rate = self._images / max(now - self._last_time, 1e-9)
        done = step - self._start_step
        eta = (now - self._start) / max(done, 1) * max(self.total - step, 0)
        self._images, self._last_time, self._last_step = 0, now, step
        if not trainer.is_global_zero:
            return
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)",
                 f"epoch {trainer.current_epoch + 1}{epochs}",
                 f"loss {loss:.4f}" if loss is not None else "loss -", f"{rate:.1f} images/s",
                 f"elapsed {_clock(now - self._start)}", f"ETA {_clock(eta)}"]
        log.info("%s", " | ".join(parts))

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics  # every rank: reading it may reduce epoch values across ranks
        values = {key: _number(metrics.get(key)) for key in ("loss", "train/probe_top1", "val/probe_top1")}
        if not trainer.is_global_zero:
            return
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs} done", f"step {trainer.global_step}/{self.total}"]
        parts += [f"{'mean loss' if key == 'loss' else key} {v:.4f}" for key, v in values.items() if v is not None]
        log.info("%s", " | ".join(parts))


def progress_callbacks(pcfg, trainer_kwargs: dict, extra: list) -> list[L.Callback]:
    """``progress.style``: the progress bar (Lightning's, as ``trainer.enable_progress_bar`` sets it) or plain
    lines (``ProgressLog``; the bar is then turned off in ``trainer_kwargs``). ``auto``: the bar when stdout
    is a terminal, lines otherwise. A progress-bar callback among the ``extra`` (config) callbacks keeps the bar."""
    import sys

    from lightning.pytorch.callbacks import ProgressBar

    from .config import ConfigError

    pcfg = pcfg or {}
    style = pcfg.get("style", "auto")
    if style not in ("auto", "bar", "lines"):
        raise ConfigError(f"progress.style: unknown value '{style}'; choose one of: auto, bar, lines")
    if not trainer_kwargs.get("enable_progress_bar", True) or any(isinstance(c, ProgressBar) for c in extra):
        return []
    if style == "bar" or (style == "auto" and sys.stdout.isatty()):
        return []
    trainer_kwargs["enable_progress_bar"] = False
    return [ProgressLog(pcfg.get("every_n_steps", "auto"))]


def config_callbacks(ccfg) -> list[L.Callback]:
    """The ``callbacks`` mapping of the config, each entry built with ``hydra.utils.instantiate`` (its
    ``_target_`` and arguments); null entries are skipped. One-line ``ConfigError`` for an entry without
    ``_target_``, one that cannot be built, or one that is not a Lightning callback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    from .config import ConfigError

    out = []
    for name, node in (ccfg or {}).items():
        if node is None:
            continue
        if not isinstance(node, (DictConfig, dict)) or "_target_" not in node:
            raise ConfigError(f"callbacks.{name}: needs a _target_, e.g. "
                              f"+callbacks.{name}._target_=lightning.pytorch.callbacks.LearningRateMonitor")
        try:
            callback = instantiate(node)
        except InstantiationException as e:
            raise ConfigError(f"callbacks.{name}: {_one_line(e)}") from None
        if not isinstance(callback, L.Callback):
            raise ConfigError(f"callbacks.{name}: {node['_target_']} is not a lightning.pytorch Callback")
        out.append(callback)
    return out


def _one_line(e: BaseException) -> str:
    """Hydra's instantiation error as one line: its own first line and the cause's message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause) not in first:
        first = f"{first} ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return " ".join(first.split())
