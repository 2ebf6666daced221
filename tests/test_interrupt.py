"""Interruptions lose nothing (issue 14) and one run directory per run (issue 13).

SIGTERM / SIGINT part-way through a step save that step and exit 128 + signum; the command the run logs
continues it to the same weights as an uninterrupted run; DDP ranks stop after one common step; SLURM's
time-limit signal requeues the job once, and the requeued job finds its directory; checkpoints are
versioned, a truncated last.ckpt falls back to the previous one, and a failed write keeps it.

The processes run ``tests/_interrupt_runner.py`` (``python -m ssl_vision.train`` plus instrumentation): it
sends the signal from inside ``training_step`` of a chosen step, so the step the run must stop at is known.
"""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RUNNER = str(Path(__file__).with_name("_interrupt_runner.py").resolve())
ROOT = Path(__file__).resolve().parents[1]
RUN = ["data=synthetic", "backbone=resnet18_tiny", "trainer.max_epochs=3", "trainer.deterministic=true",
       "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "eval.enabled=false", "plots=false",
       "method.proj_hidden_dim=64", "trainer.log_every_n_steps=1"]
DDP = ["trainer=ddp", "trainer.devices=2", "data.batch_size=32"]  # 2 gloo ranks x 32: the same 6 steps per epoch
STEPS = 18  # 3 epochs of 6 steps (384 training images, batch 64); epoch ends at steps 6, 12, 18
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "pretrain", "SLURM_NODELIST": "localhost"}


def env(**extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SSLV_", "TORCHELASTIC_"))}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def runner(*args, cwd, timeout=600, **extra):
    return subprocess.run([sys.executable, RUNNER, *args], capture_output=True, text=True, cwd=cwd,
                          env=env(**extra), timeout=timeout)


def logged_command(output: str) -> list[str]:
    """The command of the run's 'stopped by ...; continue with: <command>' line, runnable here."""
    (line,) = [ln for ln in output.splitlines() if "continue with: " in ln and "stopped by" in ln]
    words = shlex.split(line.split("continue with: ", 1)[1])
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    assert words[0] == "python", words
    return [sys.executable, *words[1:]]


def step_of(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def losses(run_dir) -> dict:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), steps
    return {int(r["step"]): float(r["train/loss_step"]) for r in rows}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted single-process run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("straight") / "run"
    r = runner(*RUN, f"hydra.run.dir={run}", cwd=run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert step_of(run / "checkpoints" / "last.ckpt") == STEPS
    return run


def test_sigterm_then_sigint_save_their_step_and_the_logged_command_resumes_exactly(tmp_path, straight):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    extra = ["checkpoint.every_n_epochs=2"]  # a permanent copy after epoch 2 (step 12)
    # SIGTERM while computing step 8 (mid-epoch, not a checkpoint step), and again during the save
    r = runner(*RUN, *extra, f"hydra.run.dir={run}", cwd=tmp_path, SSLV_SIGNAL="TERM", SSLV_SIGNAL_AT="7",
               SSLV_SECOND_SIGNAL="1")
    out = r.stdout + r.stderr
    assert r.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    assert f"stopped by SIGTERM after step 8: saved {ckpts / 'last.ckpt'}; continue with: python {RUNNER} " in out
    assert "received SIGTERM again: already stopping" in out
    assert step_of(ckpts / "last.ckpt") == 8  # the second signal did not cut the save short
    assert step_of(ckpts / "last-1.ckpt") == 6  # the previous good one: epoch 1's end
    assert not (run / "summary.json").exists() and not list(ckpts.glob(".*tmp*"))

    # the logged command, interrupted by SIGINT (Ctrl-C) while computing step 14
    r = subprocess.run(logged_command(out), capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env=env(SSLV_SIGNAL="INT", SSLV_SIGNAL_AT="13"))
    out = r.stdout + r.stderr
    assert r.returncode == 130, out[-3000:]
    assert "resuming from" in out and f"stopped by SIGINT after step 14: saved {ckpts / 'last.ckpt'}" in out
    assert (step_of(ckpts / "last.ckpt"), step_of(ckpts / "last-1.ckpt")) == (14, 12)
    assert step_of(ckpts / "epoch-0002.ckpt") == 12 and not (run / "summary.json").exists()

    # last.ckpt truncated (say, a disk error): the logged command falls back to last-1.ckpt, named in a warning
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    r = subprocess.run(logged_command(out), capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert re.search(rf"checkpoint {re.escape(str(ckpts / 'last.ckpt'))} \(.+\) is unreadable; resuming from the "
                     rf"previous checkpoint {re.escape(str(ckpts / 'last-1.ckpt'))} \(step 12\)", out), out[-3000:]
    assert step_of(ckpts / "last.ckpt") == STEPS and (run / "summary.json").exists()
    assert_same_weights(ckpts / "last.ckpt", straight / "checkpoints" / "last.ckpt")
    la, lb = losses(straight), losses(run)
    assert sorted(la) == sorted(lb) == list(range(STEPS))
    assert all(abs(la[s] - lb[s]) < 1e-5 for s in la)


def stub_scontrol(tmp_path):
    """A stub ``scontrol`` that records its arguments; returns (PATH with it first, its calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n')
    (bin_dir / "scontrol").chmod(0o755)
    calls = bin_dir / "calls"
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", lambda: calls.read_text().splitlines() if calls.exists() else []


def test_slurm_time_limit_signal_requeues_once_and_the_requeued_job_resumes_in_its_directory(tmp_path, straight):
    """Simulated SLURM job 4242 with a stub scontrol; no hydra.run.dir: the job id names the directory."""
    path, calls = stub_scontrol(tmp_path)
    job = {**SLURM, "PATH": path}
    # sbatch --signal=USR2@120 (or the submitit launcher): USR2 while computing step 10
    r = runner(*RUN, cwd=tmp_path, SSLV_SIGNAL="USR2", SSLV_SIGNAL_AT="9", **job)
    out = r.stdout + r.stderr
    assert r.returncode == 128 + signal.SIGUSR2, out[-3000:]
    (run,) = (tmp_path / "outputs").iterdir()
    assert re.fullmatch(r"slurm-4242-[0-9a-f]{8}", run.name)
    saved = run / "checkpoints" / "last.ckpt"
    assert f"stopped by SIGUSR2 after step 10: saved {saved}; requeued SLURM job 4242: it continues from" in out
    assert calls() == ["requeue 4242"]
    assert step_of(saved) == 10 and not (run / "summary.json").exists()

    # the requeued job: the same command, the same SLURM_JOB_ID
    r = runner(*RUN, cwd=tmp_path, **job)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"resuming from {saved}" in out
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [run.name]
    assert calls() == ["requeue 4242"] and (run / "summary.json").exists()
    assert_same_weights(saved, straight / "checkpoints" / "last.ckpt")


def test_only_the_time_limit_signal_requeues_and_only_once(tmp_path, monkeypatch):
    """SIGTERM is also what scancel sends: it never requeues. A requeue signal does, once, from rank 0."""
    from ssl_vision.preemption import SignalGuard

    path, calls = stub_scontrol(tmp_path)
    for key, value in {**SLURM, "PATH": path}.items():
        monkeypatch.setenv(key, value)
    guard = SignalGuard()
    assert guard.slurm_job == "4242" and signal.SIGUSR2 in guard.signals
    assert guard.requeue_job(signal.SIGTERM, rank_zero=True) == "" and calls() == []
    assert guard.requeue_job(signal.SIGUSR1, rank_zero=False) == "" and calls() == []
    for _ in range(2):
        assert guard.requeue_job(signal.SIGUSR2, rank_zero=True).startswith("; requeued SLURM job 4242")
    assert calls() == ["requeue 4242"]
    monkeypatch.delenv("SLURM_NTASKS")  # not under SLURM: the user signals are left alone
    assert SignalGuard().signals == (signal.SIGTERM, signal.SIGINT)


def test_torchrun_sigterm_to_the_launcher_stops_both_ranks_at_one_step_in_one_run_directory(tmp_path):
    """torchrun --nproc-per-node=2 without hydra.run.dir: one run directory; SIGTERM to torchrun (which passes
    it on to both ranks) stops both after the same step with exit code 143, rank 0 alone writes the
    checkpoint, and the logged torchrun command resumes to the weights of an uninterrupted 2-rank run."""
    straight = tmp_path / "straight"
    r = runner(*RUN, *DDP, f"hydra.run.dir={straight}", cwd=tmp_path)  # Lightning's own launcher
    assert r.returncode == 0, r.stderr[-3000:]

    work, report = tmp_path / "work", tmp_path / "report"
    work.mkdir()
    report.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", RUNNER, *RUN, *DDP],
                       capture_output=True, text=True, cwd=work, timeout=600,
                       env=env(SSLV_SIGNAL="TERM", SSLV_SIGNAL_AT="7", SSLV_SIGNAL_TO="parent",
                               SSLV_REPORT=str(report)))
    out = r.stdout + r.stderr
    ranks = [json.loads((report / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["exit_code"] for x in ranks] == [143, 143], out[-3000:]
    step = ranks[0]["stopped_at"]
    assert ranks[1]["stopped_at"] == step and 8 <= step < STEPS, ranks
    (run,) = [p for p in (work / "outputs").glob("*/*")]  # one directory, rank 0's
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "config.yaml", "hparams.yaml",
                                                     "metrics.csv", "train.log", "train_rank1.log"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last-1.ckpt", "last.ckpt"]
    assert (step_of(run / "checkpoints" / "last.ckpt"), step_of(run / "checkpoints" / "last-1.ckpt")) == (step, 6)
    assert out.count("stopped by SIGTERM") == 1  # one line, from rank 0

    r = subprocess.run(logged_command(out), capture_output=True, text=True, cwd=work, timeout=600, env=env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert len(list((work / "outputs").glob("*/*"))) == 1
    assert step_of(run / "checkpoints" / "last.ckpt") == STEPS
    assert_same_weights(run / "checkpoints" / "last.ckpt", straight / "checkpoints" / "last.ckpt")


def test_sigterm_to_rank_zero_under_lightnings_launcher_stops_both_ranks(tmp_path):
    """``kill <pid>`` of the process the user started (rank 0, which started rank 1): rank 1 stops after the
    same step, told by rank 0 (the one-step-late all-reduce: signalled in step 3, both stop after step 4)."""
    report = tmp_path / "report"
    report.mkdir()
    r = runner(*RUN, *DDP, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
               SSLV_SIGNAL="TERM", SSLV_SIGNAL_AT="2", SSLV_REPORT=str(report))
    assert r.returncode == 143, (r.stdout + r.stderr)[-3000:]
    ranks = [json.loads((report / f"rank{i}.json").read_text()) for i in range(2)]
    assert [(x["exit_code"], x["stopped_at"]) for x in ranks] == [(143, 4), (143, 4)]
    assert step_of(tmp_path / "run" / "checkpoints" / "last.ckpt") == 4


def test_failed_checkpoint_write_keeps_the_previous_one_and_stops_with_one_line(tmp_path):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # checkpoints at steps 2 and 4; the second torch.save writes part of its file and raises ENOSPC
    r = runner(*RUN, "checkpoint.every_n_steps=2", f"hydra.run.dir={run}", cwd=tmp_path, SSLV_ENOSPC_AT_SAVE="2")
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: could not write checkpoint {ckpts / 'last.ckpt'} at step 4: [Errno 28] No space left on device; "
        f"the previous checkpoint {ckpts / 'last.ckpt'} (step 2) is intact")
    assert step_of(ckpts / "last.ckpt") == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # the partial file is gone
    assert not (run / "summary.json").exists()


# --- in-process: the pieces ------------------------------------------------------------------------


def test_versions_rotate_and_resume_falls_back_past_unreadable_files(tmp_path, make_cfg, caplog):
    from ssl_vision.callbacks import AtomicCheckpointIO, versions
    from ssl_vision.config import ConfigError
    from ssl_vision.train import resume_point

    cfg = make_cfg()
    ckpts = tmp_path / "checkpoints"
    io = AtomicCheckpointIO(keep_last=3)
    for step in (2, 4, 6, 8):
        io.save_checkpoint({"hyper_parameters": {"cfg": {"method": {"name": cfg.method.name},
                                                         "backbone": {"name": cfg.backbone.name}}},
                            "global_step": step}, ckpts / "last.ckpt")
    assert [(p.name, step_of(p)) for p in versions(ckpts / "last.ckpt")] == \
        [("last.ckpt", 8), ("last-1.ckpt", 6), ("last-2.ckpt", 4)]
    assert resume_point(cfg, tmp_path) == (ckpts / "last.ckpt", 8)

    for name in ("last.ckpt", "last-1.ckpt"):  # truncated, garbage
        data = (ckpts / name).read_bytes()
        (ckpts / name).write_bytes(data[:100] if name == "last.ckpt" else b"\0" * len(data))
    with caplog.at_level("WARNING", logger="ssl_vision"):
        assert resume_point(cfg, tmp_path) == (ckpts / "last-2.ckpt", 4)
    (warning,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warning.startswith(f"checkpoint {ckpts / 'last.ckpt'} (") and f"; {ckpts / 'last-1.ckpt'} (" in warning
    assert warning.endswith(f"is unreadable; resuming from the previous checkpoint {ckpts / 'last-2.ckpt'} (step 4)")

    # the next save does not push the unreadable last.ckpt into last-1.ckpt: it replaces it
    io.save_checkpoint({"global_step": 5}, ckpts / "last.ckpt")
    assert step_of(ckpts / "last.ckpt") == 5 and step_of(ckpts / "last-2.ckpt") == 4

    (ckpts / "last-2.ckpt").write_bytes(b"")
    (ckpts / "last-1.ckpt").write_bytes(b"")
    (ckpts / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^resume: no readable checkpoint: .*last\.ckpt \(.*last-1\.ckpt \(.*"
                                          r"last-2\.ckpt \(.*; move them away, or resume=null to start over$"):
        resume_point(cfg, tmp_path)


def test_bad_checkpoint_settings_are_one_line_errors():
    from ssl_vision.callbacks import check_checkpoint_config
    from ssl_vision.config import ConfigError

    assert check_checkpoint_config({"every_n_steps": 1000}) == {"every_n_steps": 1000, "every_n_epochs": 0,
                                                                "keep_last": 2}
    with pytest.raises(ConfigError, match=r"^checkpoint\.keep_last: must be an integer >= 1, got 0 \(1: last\.ckpt"):
        check_checkpoint_config({"keep_last": 0})
    with pytest.raises(ConfigError, match=r"^checkpoint\.every_n_epochs: must be an integer >= 0, got -1 \(0: off\)$"):
        check_checkpoint_config({"every_n_epochs": -1})


def _agreement_worker(rank, world, init_file, out_dir):
    from ssl_vision.preemption import _Agreement

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        agreement = _Agreement(torch.device("cpu"))
        # rank 1 alone is signalled (SIGINT) before its 3rd step end, rank 0 never
        local = [0, 0, 2, 2, 2] if rank == 1 else [0] * 5
        seen = [agreement.exchange(x) for x in local]
        seen.append(agreement.now(15 if rank == 0 else 0))  # an epoch end: the pending value and rank 0's
        seen.append(agreement.now(0))
        torch.save(seen, os.path.join(out_dir, f"agree{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_stop_one_step_after_any_rank_is_signalled(tmp_path):
    mp.spawn(_agreement_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    seen = [torch.load(tmp_path / f"agree{r}.pt") for r in range(2)]
    assert seen[0] == seen[1] == [0, 0, 0, 2, 2, 15, 0]


@pytest.mark.parametrize("case", ["slurm", "slurm_rank1", "array", "run_dir_given", "multirun", "interactive",
                                  "plain"])
def test_one_run_directory_per_slurm_job(monkeypatch, case):
    from ssl_vision.rundir import launch_overrides

    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))] + ["RANK"]:
        monkeypatch.delenv(key, raising=False)
    if case != "plain":
        for key, value in SLURM.items():
            monkeypatch.setenv(key, value)
    args = ["method=moco_v2", "trainer.max_epochs=3"]
    if case == "slurm_rank1":
        monkeypatch.setenv("SLURM_PROCID", "1")
    if case == "array":
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    if case == "interactive":  # an salloc shell: SLURM does not manage the processes (Lightning's rule)
        monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    extra = launch_overrides(args + {"run_dir_given": ["hydra.run.dir=mine"], "multirun": ["-m"]}.get(case, []))
    if case in ("run_dir_given", "multirun", "interactive", "plain"):
        assert extra == []
        return
    job = "4240_2" if case == "array" else "4242"
    (run_dir,) = [e for e in extra if e.startswith("hydra.run.dir=")]
    assert re.fullmatch(rf"hydra\.run\.dir=outputs/slurm-{job}-[0-9a-f]{{8}}", run_dir)
    assert extra[1:] == (["hydra.output_subdir=null", "hydra.job.name=train_rank1"] if case == "slurm_rank1" else [])
    # the same command (overrides in any order, launcher settings aside) names the same directory; another does not
    assert launch_overrides(list(reversed(args)) + ["hydra/launcher=slurm"])[0] == run_dir
    assert launch_overrides(args + ["optimizer.lr=0.1"])[0] != run_dir


def test_metrics_csv_survives_a_kill_while_rewritten_or_appended(tmp_path, monkeypatch):
    """New columns make the CSV writer rewrite metrics.csv: a kill before the rename leaves the old file whole
    (Lightning's writer truncates it first: the SIGKILL test lost every row); a row cut short is dropped."""
    from ssl_vision import callbacks

    writer = callbacks._AtomicWriter(str(tmp_path))
    for step in range(3):
        writer.log_metrics({"train/loss_step": 5.0 - step}, step=step)
    writer.save()
    before = (tmp_path / "metrics.csv").read_text()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it

    monkeypatch.setattr(callbacks.os, "replace", killed)
    writer.log_metrics({"train/loss_epoch": 4.0}, step=3)  # a new column
    with pytest.raises(KeyboardInterrupt):
        writer.save()
    assert (tmp_path / "metrics.csv").read_text() == before
    monkeypatch.undo()

    data = (tmp_path / "metrics.csv").read_bytes()
    (tmp_path / "metrics.csv").write_bytes(data + b"2.5,3")  # a kill part-way through appending a row
    callbacks._ContinuedWriter(str(tmp_path), resume_step=10)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss_step"]) for r in rows] == [("0", "5.0"), ("1", "4.0"), ("2", "3.0")]


def test_torchrun_without_an_agent_store_names_the_directory_by_its_run_id(monkeypatch):
    from ssl_vision.config import ConfigError
    from ssl_vision.rundir import launch_overrides

    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")  # torchrun --rdzv-id=job7
    assert launch_overrides(["method=simclr"]) == ["hydra.run.dir=outputs/torchrun-job7", "hydra.output_subdir=null",
                                                   "hydra.job.name=train_rank1"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # static rendezvous without an id: nothing shared to name it
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir: under torchrun without an agent store or --rdzv-id"):
        launch_overrides(["method=simclr"])
