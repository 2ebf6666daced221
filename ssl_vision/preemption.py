"""Stop on SIGTERM, SIGINT and SLURM's time-limit signal without losing a step.

What a signal does while ``ssl-vision-train`` runs (the README's "Crash safety" says the same):

- **During training** (SIGTERM, SIGINT; under SLURM also SIGUSR1 / SIGUSR2): the optimizer step in
  progress finishes, ``last.ckpt`` is written at that step (atomically), one line says the step and the
  command that continues the run, and the process exits with 128 + the signal's number (SIGTERM 143,
  SIGINT 130, SIGUSR1 138, SIGUSR2 140). No evaluation, no ``summary.json``: the run is not finished.
  Under DDP every rank stops after the same step and rank 0 writes the checkpoint.
- **SLURM requeue:** SIGUSR1 / SIGUSR2 are the signal SLURM sends before a time limit when asked to
  (``sbatch --signal=USR2@120``; Hydra's submitit launcher asks for USR2, ``signal_delay_s`` seconds
  ahead) and, with ``PreemptParameters=send_user_signal``, on preemption. After the checkpoint, global
  rank 0 runs ``scontrol requeue <job id>`` once; the requeued job (same ``SLURM_JOB_ID``, so the same
  run directory: ``ssl_vision.rundir``) continues from that step. SIGTERM never requeues: it is also what
  ``scancel`` sends (and a preemption in ``PreemptMode=REQUEUE`` requeues the job by itself).
- **Before training starts or after it ends** (data set-up, evaluation): nothing is in flight, so the
  process stops at once with the same exit code (a finished run's checkpoint is complete: the same
  command evaluates it again).
- **A second signal** while stopping (still finishing the step, or saving) is only logged: the save is
  never cut short. SIGKILL (``kill -9``) stops without saving; the files on disk stay complete.

This replaces Lightning's own handling (2.6), which on SIGTERM stops at a random point within the step,
saves nothing, and exits with code 0, so a scheduler marks the job COMPLETED; its SLURM requeue
(``SLURMEnvironment(auto_requeue=True)``) saves from inside the signal handler, part-way through a step,
to a file ssl-vision does not resume from. Submitit's own USR2 handler likewise exits from inside the
handler without a checkpoint; while ssl-vision runs, its handlers are replaced by these.

**The cost under DDP.** The ranks agree with one all-reduce (MAX) of a 4-byte flag per optimizer step,
started asynchronously at the end of a step and read at the end of the next one (on GPUs through pinned
memory and a CUDA event recorded a step earlier: no host sync in the step). So a run stops one step
after the step in which the signal arrived; in a single process, after that very step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .rundir import slurm_job_id

log = logging.getLogger("ssl_vision")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # handled under SLURM only

_ACTIVE: SignalGuard | None = None


def active() -> SignalGuard | None:
    """The guard installed in this process (``with SignalGuard():``), if any."""
    return _ACTIVE


class Interrupted(BaseException):
    """The run stopped on a signal; ``str(self)`` is the one line for the user, ``exit_code`` 128 + signum.
    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way out swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def requeue(job: str) -> str | None:
    """``scontrol requeue <job>``; None on success, else why it failed."""
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    return None if r.returncode == 0 else f"scontrol exit code {r.returncode}: {(r.stderr or r.stdout).strip()}"


class SignalGuard:
    """Owns SIGTERM, SIGINT (and under SLURM SIGUSR1/SIGUSR2) in this process while it is entered.

    Outside training a signal raises ``Interrupted`` at once. While ``deferred`` (training), the first one is
    recorded in ``signum`` and acted on by ``StopOnSignal`` at the end of the step. Forked processes (loader
    workers) inherit the handler and ignore the signal: the main process stops them."""

    def __init__(self, command: str | None = None):
        self.pid = os.getpid()
        self.command = command  # the shell command that continues the run (``rundir.continue_command``)
        self.slurm_job = slurm_job_id()
        self.signals = STOP_SIGNALS + (REQUEUE_SIGNALS if self.slurm_job else ())
        self.signum: int | None = None
        self.deferred = False
        self.forward = None  # Lightning's launcher on rank 0 passes a signal on to the ranks it started
        self.after_training = ""  # what is on disk once training has ended, for an immediate stop's line
        self._previous: dict = {}
        self._requeued: str | None = None

    def __enter__(self) -> SignalGuard:
        global _ACTIVE
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (and Python runs them there): leave them be
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _ACTIVE = None

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self.pid:  # a forked data-loader worker: the main process stops it
            return
        if self.signum is not None:
            log.warning("received %s again: already stopping after %s (the checkpoint is saved first; "
                        "SIGKILL stops without saving)", signal_name(signum), signal_name(self.signum))
            return
        self.signum = signum
        if self.forward is not None:
            self.forward(signum)
        if not self.deferred:
            raise Interrupted(signum, self.immediate_message(signum))

    def immediate_message(self, signum: int) -> str:
        """The line for a stop outside training (requeues the job first for a requeue signal)."""
        how = f": {self.command}" if self.command else " with hydra.run.dir=<run dir>"
        line = f"stopped by {signal_name(signum)} " + (
            f"after training: {self.after_training}" if self.after_training
            else f"before training started: nothing new to save; start (or continue) the run with the command{how}")
        return line + self.requeue_job(signum, rank_zero=rank_zero_only.rank == 0)

    def requeue_job(self, signum: int, rank_zero: bool) -> str:
        """For a requeue signal under SLURM, ``scontrol requeue`` the job (global rank 0, once per process);
        returns the clause that says so for the stop line ("" otherwise)."""
        if signum not in REQUEUE_SIGNALS or not self.slurm_job or not rank_zero:
            return ""
        if self._requeued is None:
            failed = requeue(self.slurm_job)
            self._requeued = (f"; requeueing SLURM job {self.slurm_job} failed ({failed})" if failed else
                              f"; requeued SLURM job {self.slurm_job}: it continues from this checkpoint")
        return self._requeued

    def stop_message(self, signum: int, step: int, path, requeued: str = "") -> str:
        """The line for a stop after ``step`` with ``path`` saved; ``requeued``: ``requeue_job``'s clause."""
        line = f"stopped by {signal_name(signum)} after step {step}: saved {path}"
        if requeued.startswith("; requeued"):
            return line + requeued
        how = f"continue with: {self.command}" if self.command else "the same command with hydra.run.dir continues it"
        return f"{line}{requeued}; {how}"


class _Agreement:
    """The max over ranks of an integer each rank contributes once per step, without a host sync.

    ``exchange(x)`` returns the max over ranks of what they passed to the previous ``exchange`` (0 the
    first time) and starts an asynchronous all-reduce of ``x``. On a GPU the result is copied to pinned
    memory behind the reduction, with a CUDA event; by the next step that event has long completed."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending = None
        self._host = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")

    def exchange(self, value: int) -> int:
        previous = self.result()
        flag = torch.full((1,), int(value), dtype=torch.int32, device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # orders the copy after the reduction on the current stream; the host goes on
            self._host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (None, event, self._host)
        else:
            self._pending = (work, None, flag)
        return previous

    def result(self) -> int:
        """The pending exchange's max over ranks (0 if none), waiting for it."""
        if self._pending is None:
            return 0
        work, event, value = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return int(value.item())

    def now(self, value: int) -> int:
        """The max over ranks of ``value`` and of the pending exchange, synchronously (once per epoch)."""
        previous = self.result()
        flag = torch.full((1,), int(value), dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return max(previous, int(flag.item()))


class StopOnSignal(L.Callback):
    """Acts on the guard's signal at the end of an optimizer step: every rank saves through ``last`` (rank 0
    writes), then raises ``Interrupted``; and at an epoch start, for a signal that came during validation
    (saved at the epoch's end already). Place it after ``LastCheckpoint``."""

    def __init__(self, guard: SignalGuard, last):
        self.guard, self.last = guard, last
        self._agreement: _Agreement | None = None
        self._step = -1

    def setup(self, trainer, pl_module, stage):
        launcher = trainer.strategy.launcher
        if launcher is not None and trainer.is_global_zero:
            self.guard.forward = launcher.kill  # the ranks Lightning started on this node (none otherwise)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._agreement = _Agreement(trainer.strategy.root_device)

    def on_train_start(self, trainer, pl_module):
        # from here a signal waits for the end of the step; before (set-up, a random-init baseline at fit
        # start), nothing is in flight and it stops the process at once
        self.guard.deferred = True

    def _local(self) -> int:
        return int(self.guard.signum or 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._step = trainer.global_step
        signum = self._agreement.exchange(self._local()) if self._agreement else self._local()
        if signum:
            self._stop(trainer, signum)

    def on_train_epoch_start(self, trainer, pl_module):
        # a signal during the previous epoch's validation (or during set-up): that epoch's end was saved at this
        # step (LastCheckpoint), and the epoch's metrics are logged by now; nothing new to save
        signum = self._agreement.now(self._local()) if self._agreement else self._local()
        if not signum:
            return
        self.guard.signum = self.guard.signum or signum
        if trainer.global_step == 0:
            raise Interrupted(signum, self.guard.immediate_message(signum))
        requeued = self.guard.requeue_job(signum, trainer.is_global_zero)
        raise Interrupted(signum, self.guard.stop_message(signum, trainer.global_step, self.last.path, requeued))

    def teardown(self, trainer, pl_module, stage):
        if self._agreement is not None:
            self._agreement.result()  # no reduction left in flight

    def _stop(self, trainer, signum: int) -> None:
        self.guard.signum = self.guard.signum or signum  # a rank told by the others acts as if signalled
        # Lightning logs a step's metrics after on_train_batch_end, which the stop does not return to
        trainer._logger_connector.update_train_step_metrics()
        self.last.save(trainer)  # every rank; a failed write raises CheckpointWriteError on all of them
        requeued = self.guard.requeue_job(signum, trainer.is_global_zero)  # after the save, never before
        raise Interrupted(signum, self.guard.stop_message(signum, trainer.global_step, self.last.path, requeued))


def after_fit(trainer, last_path) -> None:
    """Call when ``trainer.fit`` has returned: a signal that came after the last step stops the run here
    (all ranks agree), before evaluation; from now on a signal stops the process at once."""
    guard = _ACTIVE
    if guard is None:
        return
    signum = int(guard.signum or 0)
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        flag = torch.full((1,), signum, dtype=torch.int32, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    done = f"training is complete ({last_path} at step {trainer.global_step})"
    how = f"the same command evaluates it: {guard.command}" if guard.command else "the same command evaluates it"
    guard.after_training = f"{done}; {how}"
    guard.deferred = False
    if signum:
        guard.signum = guard.signum or signum
        raise Interrupted(signum, guard.immediate_message(signum))
