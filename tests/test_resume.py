"""A run killed with SIGKILL and started again with the same command ends with the same weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

RUN = ["data=synthetic", "backbone=resnet18_tiny", "trainer.max_epochs=4", "trainer.deterministic=true",
       "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "eval.enabled=false",
       "method.proj_hidden_dim=64"]
METHODS = {"simclr": ["method=simclr"], "moco_v2": ["method=moco_v2", "method.queue_size=128"]}


def command(run_dir, extra):
    return [sys.executable, "-m", "ssl_vision.train", *extra, *RUN, f"hydra.run.dir={run_dir}"]


def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    r = subprocess.run(command(straight, METHODS[method]), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, METHODS[method]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    ckpt = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: at least one epoch is saved, the run is not over
    proc.wait()
    assert ckpt.exists()
    _, step_at_kill = final_state(killed)
    assert 0 < step_at_kill < final_state(straight)[1]

    r = subprocess.run(command(killed, METHODS[method]), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout + r.stderr
    a, step_a = final_state(straight)
    b, step_b = final_state(killed)
    assert step_a == step_b
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
