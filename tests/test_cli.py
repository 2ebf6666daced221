"""The command line as a user meets it: error messages, a tiny run end to end, and the probe."""

import json
import subprocess
import sys

import pytest

from ssl_vision.config import ConfigError, check_overrides

from .conftest import TINY


def cli(module, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", f"ssl_vision.{module}", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_unknown_group_option_lists_valid_choices():
    with pytest.raises(ConfigError) as e:
        check_overrides(["backbone=resnet5"], "train")
    msg = str(e.value)
    assert "\n" not in msg and "unknown backbone 'resnet5'" in msg
    for option in ("resnet18", "resnet50", "vit_small"):
        assert option in msg


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        check_overrides(["trainer.max_epoch=3"], "train")
    msg = str(e.value)
    assert "\n" not in msg and "'trainer.max_epoch'" in msg and "did you mean 'max_epochs'" in msg


def test_sweep_values_are_checked_each():
    check_overrides(["-m", "method=simclr", "optimizer.lr=0.1,0.3"], "train")
    with pytest.raises(ConfigError, match="unknown method 'simclrr'"):
        check_overrides(["-m", "method=simclr,simclrr"], "train")


def test_bad_override_from_the_shell_is_one_line_without_traceback(tmp_path):
    r = cli("train", "backbone=resnet5", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown backbone 'resnet5'")
    assert "Traceback" not in r.stderr


def test_bad_setting_found_at_start_up_is_one_line(tmp_path):
    r = cli("train", "data=imagefolder", f"data.path={tmp_path / 'nope'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: data.path: '{tmp_path / 'nope'}' does not exist; "
                                             "expected a folder with one sub-folder of images per class "
                                             "(optionally under train/ and val/)"]


def test_tiny_run_writes_its_outputs_and_probe_reproduces_it(tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("method", "backbone", "data", "steps", "train_seconds", "online_probe_top1",
                "linear_probe_top1", "knn_top1", "random_init_linear_probe_top1"):
        assert key in summary, key
    assert summary["method"] == "simclr" and summary["data"] == "synthetic"
    assert summary["steps"] == 384 // 64  # 512 samples, 25% held out, batch 64, drop_last
    assert 0.0 <= summary["linear_probe_top1"] <= 1.0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    assert "train/loss_step" in (run / "metrics.csv").read_text().splitlines()[0]

    p = cli("probe", f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "eval.linear.epochs=5",
            f"hydra.run.dir={tmp_path / 'probe'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    probed = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert abs(probed["linear_probe_top1"] - summary["linear_probe_top1"]) < 1e-6
    assert abs(probed["knn_top1"] - summary["knn_top1"]) < 1e-6


def test_probe_without_checkpoint_says_how_to_call_it(tmp_path):
    r = cli("probe", cwd=tmp_path)
    assert r.returncode == 2 and "checkpoint: not set" in r.stderr and "Traceback" not in r.stderr


def test_multirun_sweep_writes_a_table_of_every_job(tmp_path):
    r = cli("train", "-m", *TINY, "eval.random_init_baseline=false", "optimizer.lr=0.1,0.3",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "sweep" / "sweep_summary.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("job,overrides,method")
    assert "optimizer.lr=0.1" in table[1] and "optimizer.lr=0.3" in table[2]
    md = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert md.count("| simclr |") == 2


def test_launcher_overrides_and_hydra_flags_pass_the_check():
    for args in (["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                  "trainer.devices=8"],
                 ["-m", "hydra/launcher=submitit_slurm", "method=simclr,moco_v2"],
                 ["--cfg", "job", "trainer.num_nodes=2"], ["-c", "hydra", "hydra/launcher=slurm"],
                 ["--info", "defaults", "trainer.devices=2"]):
        check_overrides(args, "train")
    # a flag's value is not an override, but the overrides around it are still checked
    with pytest.raises(ConfigError, match="unknown setting 'trainer.num_node'"):
        check_overrides(["--cfg", "job", "trainer.num_node=2"], "train")


def test_slurm_launcher_allocation_follows_the_trainer():
    from hydra import compose, initialize_config_dir

    from ssl_vision.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


def test_several_loggers_from_the_shell_compose(tmp_path):
    r = cli("train", "logger=[csv,tensorboard]", "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks."
            "LearningRateMonitor", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(r.stdout)
    assert list(cfg.logger) == ["csv", "tensorboard"]
    assert cfg.logger.tensorboard._target_ == "lightning.pytorch.loggers.TensorBoardLogger"
    assert cfg.callbacks.lr_monitor._target_ == "lightning.pytorch.callbacks.LearningRateMonitor"


def test_a_method_target_that_is_not_a_method_is_one_line_from_the_shell(tmp_path):
    r = cli("train", *TINY, "method._target_=collections.OrderedDict", "method.name=ordered", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: method._target_: 'collections.OrderedDict' is not a subclass of "
                                             "ssl_vision.methods.base.SSLMethod"]
