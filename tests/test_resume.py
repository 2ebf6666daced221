"""A run killed with SIGKILL and started again with the same command ends with the same weights, whether
its last checkpoint was taken at an epoch end or part-way through an epoch."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

RUN = ["data=synthetic", "backbone=resnet18_tiny", "trainer.max_epochs=4", "trainer.deterministic=true",
       "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "eval.enabled=false",
       "method.proj_hidden_dim=64", "trainer.log_every_n_steps=1"]
METHODS = {"simclr": ["method=simclr"], "moco_v2": ["method=moco_v2", "method.queue_size=128"]}
STEPS_PER_EPOCH = 6  # 384 training images of data=synthetic, batch 64
# mid-epoch: a checkpoint every 4 steps (the first at step 4 of 6), and loader workers for simclr
# mid_epoch_ddp: 2 gloo processes x 32 images (the same 6 steps per epoch)
CHECKPOINTS = {"epoch_end": [], "mid_epoch": ["checkpoint.every_n_steps=4"],
               "mid_epoch_ddp": ["checkpoint.every_n_steps=4", "trainer=ddp", "trainer.devices=2",
                                 "data.batch_size=32"]}
# each kind of checkpoint once, MoCo v2 (EMA encoder + queue) where it matters most; SimCLR with a loader worker
CASES = [("moco_v2", "epoch_end"), ("simclr", "mid_epoch"), ("moco_v2", "mid_epoch_ddp")]


def command(run_dir, extra):
    return [sys.executable, "-m", "ssl_vision.train", *extra, *RUN, f"hydra.run.dir={run_dir}"]


def losses(run_dir):
    """{step: train/loss_step} from the run's metrics.csv (kept across the kill and extended)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), steps  # each step logged once
    return {int(r["step"]): float(r["train/loss_step"]) for r in rows}


def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


@pytest.mark.parametrize("method,when", CASES)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, method, when):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = METHODS[method] + CHECKPOINTS[when] + (["data.num_workers=1"] if when == "mid_epoch" and
                                                   method == "simclr" else [])
    straight = tmp_path / "straight"
    r = subprocess.run(command(straight, extra), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    ckpt = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, with every rank's process: the run is not over
    proc.wait()
    assert ckpt.exists()
    _, step_at_kill = final_state(killed)
    assert 0 < step_at_kill < final_state(straight)[1]
    assert (step_at_kill % STEPS_PER_EPOCH != 0) == when.startswith("mid_epoch"), step_at_kill

    r = subprocess.run(command(killed, extra), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout + r.stderr
    a, step_a = final_state(straight)
    b, step_b = final_state(killed)
    assert step_a == step_b
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    la, lb = losses(straight), losses(killed)
    assert sorted(la) == sorted(lb) == list(range(step_a))
    assert all(abs(la[s] - lb[s]) < 1e-5 for s in la), (la, lb)
