"""The ``logger`` config group: TensorBoard event files from a run, several loggers at once, the W&B run id
kept across a resume, and a one-line error naming the pip extra when a logger's package is missing."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_vision.config import ConfigError, check_overrides
from ssl_vision.loggers import build_loggers
from ssl_vision.train import run

# small and quick: 384 training images of data=synthetic at batch 32 = 12 steps per epoch
QUICK = ("data=synthetic", "backbone=resnet18_tiny", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "data.batch_size=32", "method.proj_hidden_dim=64", "eval.enabled=false", "plots=false")


def test_tensorboard_run_writes_the_loss_the_online_probe_and_the_lr(tmp_path, make_cfg):
    # ssl-vision-train logger=tensorboard trainer.max_steps=20, in this process
    cfg = make_cfg(*QUICK, "logger=tensorboard", "trainer.max_steps=20", "trainer.max_epochs=-1",
                   "trainer.log_every_n_steps=2", f"+run_dir={tmp_path}")
    assert list(cfg.logger) == ["tensorboard"]
    summary = run(cfg)
    assert summary["steps"] == 20
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss_step", "train/lr", "val/probe_top1", "train/probe_top1", "train/images_per_second",
                "train/images_per_second_per_device"):
        assert tag in tags, (tag, tags)
    loss = acc.Scalars("train/loss_step")
    assert [e.step for e in loss] == list(range(1, 20, 2))  # every log_every_n_steps=2 (step index 1, 3, ...)
    assert all(torch.isfinite(torch.tensor(e.value)) for e in loss)
    probe = acc.Scalars("val/probe_top1")
    # validated at the end of epoch 1 (12 steps); the run stops at step 20, part-way through epoch 2
    assert len(probe) == 1 and 0.0 <= probe[0].value <= 1.0
    assert not (tmp_path / "metrics.csv").exists()  # csv not chosen: no metrics.csv, and no curves from it


def test_several_loggers_at_once_pass_the_override_check_and_compose(make_cfg):
    check_overrides(["logger=[csv,tensorboard]"], "train")
    check_overrides(["+logger=wandb"], "train")
    check_overrides(["logger=[csv,tensorboard]", "logger.tensorboard.name=tb"], "train")
    with pytest.raises(ConfigError, match=r"unknown logger 'tensorbord' \(did you mean 'tensorboard'\?\); choose "
                                          r"one of: csv, mlflow, tensorboard, wandb"):
        check_overrides(["logger=[csv,tensorbord]"], "train")
    assert list(make_cfg().logger) == ["csv"]  # the default: metrics.csv, as before
    assert list(make_cfg("logger=[csv,tensorboard]").logger) == ["csv", "tensorboard"]
    assert list(make_cfg("+logger=wandb").logger) == ["csv", "wandb"]
    assert "logger" not in make_cfg("logger=[]")


def test_loggers_are_built_into_the_run_directory(tmp_path, make_cfg):
    from lightning.pytorch.loggers import TensorBoardLogger

    from ssl_vision.callbacks import RunCSVLogger

    loggers = build_loggers(make_cfg("logger=[csv,tensorboard]").logger, tmp_path, resume_step=7)
    csv_logger, tb = loggers["csv"], loggers["tensorboard"]
    assert isinstance(csv_logger, RunCSVLogger) and csv_logger.resume_step == 7
    assert Path(csv_logger.log_dir) == tmp_path  # <run dir>/metrics.csv, as before
    assert isinstance(tb, TensorBoardLogger) and Path(tb.log_dir) == tmp_path / "tensorboard"


@pytest.mark.parametrize("logger,package,extra", [("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow"),
                                                   ("tensorboard", "tensorboard", "tensorboard")])
def test_a_logger_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path, make_cfg, monkeypatch, logger,
                                                                        package, extra):
    import importlib.util

    real = importlib.util.find_spec
    missing = {"wandb", "mlflow", "tensorboard", "tensorboardX"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ConfigError) as e:
        build_loggers(make_cfg(f"+logger={logger}").logger, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"logger.{logger}: ")
    assert f"needs the '{package}' package" in msg and f'pip install "ssl-vision[{extra}]"' in msg


def test_a_logger_entry_that_is_not_a_logger_is_one_line(tmp_path, make_cfg):
    from omegaconf import OmegaConf

    for node, expected in (({"mine": {"save_dir": None}}, "logger.mine: needs a _target_"),
                           ({"mine": {"_target_": "collections.OrderedDict"}}, "is not a Lightning logger"),
                           ({"mine": {"_target_": "no_such_pkg.Logger"}}, "cannot import 'no_such_pkg.Logger'"),
                           ({"tb": {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "nope": 1}},
                            "logger.tb: ")):
        with pytest.raises(ConfigError, match=expected) as e:
            build_loggers(OmegaConf.create(node), tmp_path)
        assert "\n" not in str(e.value)


def _train(run_dir, *extra):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "ssl_vision.train", *QUICK, "logger=[csv,wandb]", *extra,
                        f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_wandb_offline_run_and_its_resume_share_one_run_id(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "trainer.max_epochs=1")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    run_id = ckpt["logger_run_ids"]["wandb"]
    first = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert [name.rsplit("-", 1)[1] for name in first] == [run_id]

    r = _train(run_dir, "trainer.max_epochs=2")  # resume=auto: continues from last.ckpt (step 12) to step 24
    assert "resuming from" in r.stdout + r.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 24 and ckpt["logger_run_ids"] == {"wandb": run_id}
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {name.rsplit("-", 1)[1] for name in runs} == {run_id}  # one W&B run, two sessions
    # the csv logger beside it kept metrics.csv across the resume
    with open(run_dir / "metrics.csv", newline="") as f:
        logged = sorted({int(row["step"]) for row in csv.DictReader(f)})
    assert logged[0] < 12 < logged[-1]
