"""``ssl-vision-train`` with test instrumentation, for ``tests/test_interrupt.py``.

It is run as a script, so that Lightning's DDP launcher and torchrun start it again for the other
ranks. Without the variables below it is exactly ``python -m ssl_vision.train``. Environment:

- ``SSLV_SIGNAL`` (``TERM``, ``INT``, ``USR1``, ``USR2``) and ``SSLV_SIGNAL_AT=<k>``: the signal is sent from
  inside ``training_step`` of optimizer step k + 1 (global_step == k), i.e. part-way through a step;
  ``SSLV_SIGNAL_RANK`` (default 0) is the rank that sends it, ``SSLV_SIGNAL_TO`` is ``self`` (default) or
  ``parent`` (the launcher that started this rank, e.g. torchrun's agent).
- ``SSLV_SECOND_SIGNAL=1``: the same signal again to this process from inside the checkpoint write of the stop.
- ``SSLV_ENOSPC_AT_SAVE=<n>``: the n-th ``torch.save`` writes part of its file, then raises ``OSError(ENOSPC)``.
- ``SSLV_REPORT=<dir>``: each rank writes ``<dir>/rank<r>.json`` with its exit code and the step it stopped at.
"""

import errno
import json
import os
import signal
from pathlib import Path

import torch

from ssl_vision import preemption
from ssl_vision.methods.base import SSLMethod
from ssl_vision.train import main

RANK = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
REPORT: dict = {"rank": RANK, "stopped_at": None}


def _signal():
    return getattr(signal, f"SIG{os.environ['SSLV_SIGNAL']}")


if "SSLV_SIGNAL" in os.environ and RANK == int(os.environ.get("SSLV_SIGNAL_RANK", "0")):
    at, sent = int(os.environ["SSLV_SIGNAL_AT"]), []
    training_step = SSLMethod.training_step

    def _training_step(self, batch, batch_idx):
        if self.global_step == at and not sent:
            sent.append(True)
            target = os.getppid() if os.environ.get("SSLV_SIGNAL_TO") == "parent" else os.getpid()
            os.kill(target, _signal())
        return training_step(self, batch, batch_idx)

    SSLMethod.training_step = _training_step

_save, _saves, _second = torch.save, [], []


def _instrumented_save(obj, f, *args, **kwargs):
    _saves.append(f)
    guard = preemption.active()
    if os.environ.get("SSLV_SECOND_SIGNAL") and guard is not None and guard.signum and not _second:
        _second.append(True)
        os.kill(os.getpid(), guard.signum)  # handled at the next bytecode: in the middle of this save
    if str(len(_saves)) == os.environ.get("SSLV_ENOSPC_AT_SAVE"):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _save(obj, f, *args, **kwargs)


torch.save = _instrumented_save

_stop = preemption.StopOnSignal._stop


def _recording_stop(self, trainer, signum):
    REPORT["stopped_at"] = trainer.global_step
    return _stop(self, trainer, signum)


preemption.StopOnSignal._stop = _recording_stop

if __name__ == "__main__":
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        if os.environ.get("SSLV_REPORT"):
            REPORT["exit_code"] = code
            Path(os.environ["SSLV_REPORT"], f"rank{RANK}.json").write_text(json.dumps(REPORT))
