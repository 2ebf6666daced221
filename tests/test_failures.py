"""Bad settings fail before training with one line naming the setting; a NaN run stops cleanly."""

import subprocess
import sys

import pytest
import torch

from ssl_vision.config import ConfigError
from ssl_vision.train import run

from .conftest import TINY

CASES = {
    "zero lr": (["optimizer.lr=0"], "optimizer.lr: must be a positive number, got 0"),
    "negative lr": (["optimizer.lr=-0.1"], "optimizer.lr: must be a positive number, got -0.1"),
    "batch > data": (["data.batch_size=100000"], "data.batch_size: 100000 is larger than the training set"),
    "queue vs batch": (["method=moco_v2", "method.queue_size=100"], "method.queue_size: 100 is not a multiple"),
    "mae on resnet": (["method=mae"], "needs a vit backbone"),
    "patch": (["backbone=vit_tiny", "backbone.patch_size=5"], "backbone.patch_size: image size 16 is not divisible by the ViT patch 5; use backbone.patch_size=2 or 4 or 8"),
    "unknown timm": (["backbone.name=resnet181"], "backbone.name: unknown timm model 'resnet181'; close matches: resnet18"),
    "bad precision": (["trainer.precision=8"], "trainer.precision: Precision 8 is invalid. Allowed precision values:"),
    "unknown optimizer": (["optimizer.name=adam"], "optimizer.name: unknown optimizer 'adam'; choose one of: sgd, adamw, lars"),
}


def train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ssl_vision.train", *TINY, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_setting_is_one_line_before_training(make_cfg, tmp_path, case):
    """Each bad setting is a one-line ConfigError naming it, raised before anything is trained (in-process:
    tests/test_cli.py checks that the entry points print such an error as one line with exit code 2)."""
    overrides, expected = CASES[case]
    cfg = make_cfg(*TINY, *overrides, f"+run_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as e:
        run(cfg)
    line = str(e.value)
    assert "\n" not in line and expected in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
    close = line.partition("close matches: ")[2].partition(" (")[0].split(", ")
    assert len(close) == len(set(close))  # each suggestion once


def test_checkpoint_of_another_method_is_refused_on_resume(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(make_cfg(*TINY, "trainer.max_steps=1", "eval.enabled=false", "plots=false", f"+run_dir={run_dir}"))
    with pytest.raises(ConfigError) as e:
        run(make_cfg(*TINY, "method=moco_v2", "method.queue_size=128", f"+run_dir={run_dir}"))
    assert str(e.value) == (f"resume: checkpoint '{run_dir}/checkpoints/last.ckpt' was trained with method "
                            "'simclr', but this config has method 'moco_v2'; use method=simclr or a new run directory")


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = train("optimizer.name=sgd", "optimizer.lr=1e30", "optimizer.warmup_epochs=0", "checkpoint.every_n_steps=1",
              f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite") and "step" in line, r.stderr[-2000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    if ckpt.exists():  # whatever was kept is a good state
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert f"the last good checkpoint is {ckpt}" in line
    else:
        assert "no checkpoint was written yet" in line
    assert not (run / "summary.json").exists()


def test_nan_on_one_rank_stops_both_ranks_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    """2 gloo processes started as torchrun / srun start them (each its own process, ranks from the
    environment); rank 1 alone gets a NaN loss at step 3. Both ranks must exit with code 1 and the same
    one-line error within seconds (no rank left waiting in an all-reduce), keeping step 3's checkpoint."""
    import json
    import os
    import socket
    import time
    from pathlib import Path

    run, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("ddp_instrumented.py")
    args = [sys.executable, str(script), *TINY, "trainer.max_epochs=2", "trainer=ddp", "trainer.devices=2",
            "eval.enabled=false", "checkpoint.every_n_steps=1", "trainer.log_every_n_steps=50", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSLV_TEST_RECORD": str(record), "SSLV_TEST_NAN": "1:3",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    ended = [None, None]
    try:
        deadline = time.time() + 300
        while None in ended and time.time() < deadline:
            for r, p in enumerate(procs):
                if ended[r] is None and p.poll() is not None:
                    ended[r] = time.time()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [p.communicate() for p in procs]
    assert None not in ended, "a rank was still running 300 s after the start (waiting in a collective)"
    lines = [err.strip().splitlines()[-1] for _, err in outputs]
    assert [p.returncode for p in procs] == [1, 1], [err[-2000:] for _, err in outputs]
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("error: non-finite loss nan at step 3 (rank 1 of 2)"), lines[0]
    assert all("Traceback" not in err for _, err in outputs)
    injected = float((record / "nan_time").read_text())
    assert max(ended) - injected < 30  # the check follows at the next checkpoint step, not at a timeout
    ckpt = run / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is {ckpt}" in lines[0]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3  # the state before the NaN step
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert not (run / "summary.json").exists() and json.loads((record / "rank1.json").read_text())["probes"] == []
