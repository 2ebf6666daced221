"""One run directory per run, decided once for all of its processes, and the command that continues it.

Hydra resolves ``hydra.run.dir`` (``outputs/<date>/<time>``) in every process it starts. Lightning's own
DDP launcher hands rank 0's directory to the processes it starts, but under ``torchrun`` and ``srun``
every rank resolves it itself (ranks a second apart write to two directories, and ``resume=auto`` finds
the checkpoint on rank 0 only), and a requeued SLURM job would start a new directory instead of
continuing. ``launch_overrides`` runs before Hydra (``ssl_vision.train.main``) and pins the directory:

- ``hydra.run.dir`` given, or a multirun (``-m``: Hydra's sweep directory, which the submitit launcher
  resolves once when it submits): unchanged.
- SLURM-managed (``srun``, or ``sbatch`` running the command itself): ``outputs/slurm-<job id>-<digest>``,
  where the digest is of the command's overrides. Every rank and every requeue of the job (same
  ``SLURM_JOB_ID``) agree on it, and two different commands run in one job do not share it.
- ``torchrun``: rank 0 resolves the directory and hands it to the other ranks through the key-value store
  that torchrun's agent already serves for the ranks' rendezvous (``MASTER_ADDR:MASTER_PORT``); without
  that store, ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``) names it.

Ranks > 0 also get ``hydra.output_subdir=null`` (rank 0 alone writes ``.hydra/``) and a log file of their
own (``train_rank<r>.log``), as Lightning's launcher gives its processes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from datetime import timedelta
from pathlib import Path

from .config import ConfigError

#: Hydra flags after which no run directory is made (they print and exit), or that sweep (-m)
_NO_RUN_FLAGS = {"-m", "--multirun", "-c", "--cfg", "--info", "-i", "-h", "--help", "--hydra-help", "--version",
                 "-sc", "--shell-completion"}


def slurm_job_id() -> str | None:
    """This SLURM-managed run's job, as ``scontrol`` names it: ``<array job>_<task>`` for an array task,
    else ``SLURM_JOB_ID``; None when SLURM does not manage the processes (Lightning's own test: an
    interactive ``salloc`` shell is not SLURM-managed)."""
    # Lightning's SLURMEnvironment.detect() without its srun-not-used warning
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def _torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def global_rank() -> int:
    """This process's rank from its launcher's environment (before any process group exists)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ and (key != "SLURM_PROCID" or slurm_job_id()):
            return int(os.environ[key])
    return 0


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value (quoted when it holds characters the override grammar reads)."""
    if re.fullmatch(r"[\w./+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def launch_overrides(args: list[str]) -> list[str]:
    """Overrides to append to the command line ``args`` so that all processes of this run, and a requeued
    SLURM job, use one run directory (see the module docstring); ``[]`` when Hydra's own choice stands."""
    from .config import _override_args

    if any(a in _NO_RUN_FLAGS or a.startswith(("--cfg=", "--info=", "--shell-completion=")) for a in args):
        return []
    overrides = _override_args(args)
    if any(o.lstrip("+~").split("=", 1)[0] == "hydra.run.dir" for o in overrides):
        return []
    job = slurm_job_id()
    if job:
        task = sorted(o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/")))
        digest = hashlib.sha1("\0".join(task).encode()).hexdigest()[:8]
        run_dir = f"outputs/slurm-{job}-{digest}"
    elif _torchrun():
        run_dir = _torchrun_run_dir()
    else:
        return []
    extra = [f"hydra.run.dir={hydra_value(run_dir)}"]
    rank = global_rank()
    if rank > 0:
        extra += ["hydra.output_subdir=null", f"hydra.job.name=train_rank{rank}"]
    return extra


def default_run_dir() -> str:
    """``hydra.run.dir`` of ``conf/train.yaml`` (``outputs/<date>/<time>``), resolved now."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from .config import conf_dir

    setup_globals()  # Hydra's ${now:...} resolver
    return str(OmegaConf.load(conf_dir() / "train.yaml").hydra.run.dir)


def _torchrun_run_dir() -> str:
    """Rank 0's run directory, for every rank of this torchrun launch."""
    rank, run_id = int(os.environ["RANK"]), os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(minutes=10))
        key = f"ssl_vision/run_dir/{run_id}"
        if rank == 0:  # compare_set: an existing value wins (a restarted rank 0 keeps the directory)
            return store.compare_set(key, "", default_run_dir()).decode()
        return store.get(key).decode()  # waits for rank 0
    if run_id not in ("", "none"):
        return f"outputs/torchrun-{run_id}"
    raise ConfigError("hydra.run.dir: under torchrun without an agent store or --rdzv-id, each process would pick "
                      "its own run directory; set hydra.run.dir=<dir> (or pass --rdzv-id to torchrun)")


def continue_command(out: Path, module: str = "ssl_vision.train") -> str:
    """The shell command that continues this run: how it was started (``python -m ssl_vision.train``,
    ``ssl-vision-train``, ``torchrun ... -m ssl_vision.train``, ``srun ...``), its overrides, and
    ``hydra.run.dir=<out>`` (``resume=auto`` then picks up the run's last checkpoint). ``module``: the entry
    point's module (``ssl_vision.finetune``: ``ssl-vision-finetune``)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None and sys.argv[0].endswith(".py"):  # a script that calls ssl_vision.train.main
        program = [sys.argv[0]]
    else:  # python -m ssl_vision.train, or another runner (e.g. submitit's, in a SLURM job)
        program = ["-m", module]
    script = "ssl-vision-" + module.rsplit(".", 1)[-1]
    if Path(sys.argv[0]).name == script:
        head = [script]
    elif _torchrun():
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        head = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []),
                f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", *program]
    else:
        head = ["python", *program]
    if slurm_job_id() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        head = ["srun", *head]
    return shlex.join([*head, *overrides, f"hydra.run.dir={hydra_value(str(out))}"])
