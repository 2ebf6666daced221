"""Callbacks from the config, progress lines when output is not a terminal, and throughput: images/s per
device, the FLOPs per image of a training step (against a count of the same step done by hand) and MFU."""

import json
import math
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ssl_vision.callbacks import (PEAK_FLOPS, LastCheckpoint, ProgressLog, Throughput, compute_dtype, config_callbacks,
                                  peak_chip, progress_callbacks)
from ssl_vision.config import ConfigError, check_overrides
from ssl_vision.data import SSLDataModule
from ssl_vision.methods import build_method
from ssl_vision.train import run

QUICK = ("data=synthetic", "backbone=resnet18_tiny", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "data.batch_size=32", "method.proj_hidden_dim=64", "eval.enabled=false", "plots=false")
LR_MONITOR = "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor"


def test_a_callback_from_the_config_runs_beside_the_suites_own(tmp_path, make_cfg):
    check_overrides([LR_MONITOR], "train")
    cfg = make_cfg(*QUICK, LR_MONITOR, "+callbacks.lr_monitor.logging_interval=step", "trainer.max_steps=4",
                   "trainer.log_every_n_steps=1", f"+run_dir={tmp_path}")
    run(cfg)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    lr_columns = [c for c in header if c.startswith("lr-")]  # LearningRateMonitor's, one per parameter group
    assert lr_columns, header
    assert "train/loss_step" in header and "train/images_per_second" in header  # Throughput still logs
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # LastCheckpoint still saves


def test_config_callbacks_are_instantiated_and_bad_entries_are_one_line():
    from lightning.pytorch.callbacks import LearningRateMonitor

    built = config_callbacks(OmegaConf.create({
        "lr": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor", "logging_interval": "epoch"},
        "off": None}))
    assert len(built) == 1 and isinstance(built[0], LearningRateMonitor) and built[0].logging_interval == "epoch"
    for node, expected in (({"x": {"logging_interval": "step"}}, "callbacks.x: needs a _target_"),
                           ({"x": {"_target_": "collections.OrderedDict"}}, "callbacks.x: collections.OrderedDict is "
                                                                            "not a lightning.pytorch Callback"),
                           ({"x": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor",
                                   "logging_interval": "hour"}}, "callbacks.x: "),
                           ({"x": {"_target_": "no_such_module.Callback"}}, "callbacks.x: ")):
        with pytest.raises(ConfigError, match=re.escape(expected)) as e:
            config_callbacks(OmegaConf.create(node))
        assert "\n" not in str(e.value)


def test_progress_bar_in_a_terminal_plain_lines_otherwise(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    for tty in (True, False):
        monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
        kwargs = {"enable_progress_bar": True}
        added = progress_callbacks({"style": "auto", "every_n_steps": "auto"}, kwargs, [])
        if tty:
            assert added == [] and kwargs["enable_progress_bar"]  # Lightning's bar, as before
        else:
            assert len(added) == 1 and isinstance(added[0], ProgressLog) and not kwargs["enable_progress_bar"]
    kwargs = {"enable_progress_bar": True}
    assert progress_callbacks({"style": "bar"}, kwargs, []) == [] and kwargs["enable_progress_bar"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(progress_callbacks({"style": "lines", "every_n_steps": 3}, kwargs, [])[0], ProgressLog)
    assert progress_callbacks({}, {"enable_progress_bar": False}, []) == []  # progress off: nothing at all
    assert progress_callbacks({"style": "lines"}, {"enable_progress_bar": True}, [TQDMProgressBar()]) == []
    with pytest.raises(ConfigError, match="progress.style: unknown value 'fancy'; choose one of: auto, bar, lines"):
        progress_callbacks({"style": "fancy"}, {}, [])
    with pytest.raises(ConfigError, match="progress.every_n_steps: must be an integer >= 1 or auto, got 0"):
        ProgressLog(0)


def test_run_redirected_to_a_file_has_plain_lines_every_tenth_of_training_and_throughput(tmp_path):
    """``ssl-vision-train > run.log``: no carriage return anywhere, a progress line at least every 10% of
    training (here 24 steps: auto = every 2), and summary.json with images/s per device, FLOPs per image on
    the CPU, and the run's provenance."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "w") as f:  # a file, as the shell's > makes it: not a terminal
        r = subprocess.run([sys.executable, "-m", "ssl_vision.train", "data=synthetic", "backbone=resnet18_tiny",
                            "trainer.accelerator=cpu", "data.batch_size=32", "method.proj_hidden_dim=64",
                            "trainer.max_epochs=2", "eval.linear.epochs=2", "eval.random_init_baseline=false",
                            "plots=false",
                            f"hydra.run.dir={run_dir}"], stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    assert "\r" not in text
    total = 2 * (384 // 32)
    lines = re.findall(r"step (\d+)/(\d+) \(\d+%\) \| epoch \d+/2 \| loss [\d.]+ \| [\d.]+ images/s \| "
                       r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d", text)
    steps = [int(s) for s, n in lines]
    assert {int(n) for _, n in lines} == {total}
    assert steps == list(range(2, total + 1, 2))  # auto: every ceil(24 / 20) = 2 steps
    gaps = [b - a for a, b in zip([0] + steps, steps)]
    assert max(gaps) <= total / 10 and steps[-1] == total
    assert len(re.findall(r"epoch \d/2 done \| step \d+/24 \| mean loss [\d.]+ \| train/probe_top1 [\d.]+ \| "
                          r"val/probe_top1 [\d.]+", text)) == 2

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_images_per_second"] > 0 and summary["train_devices"] == 1
    assert summary["train_images_per_second_per_device"] == summary["train_images_per_second"]
    assert summary["flops_per_image"] > 0 and "mfu" not in summary  # a CPU: no known peak, no MFU
    prov = summary["provenance"]
    assert prov["ssl_vision_version"] and prov["versions"]["torch"] == torch.__version__
    assert prov["versions"]["lightning"] == L.__version__ and prov["versions"]["timm"] and prov["versions"]["kornia"]
    assert prov["accelerator"] == "cpu" and sum(prov["devices"].values()) == 1 and prov["precision"] == "32-true"
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])  # run from this checkout


class _KeepBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch


@pytest.mark.parametrize("overrides", [("method=simclr", "backbone=resnet18_tiny"),
                                       ("method=moco_v3", "backbone=resnet18_tiny"),
                                       ("method=mae", "backbone=vit_tiny", "backbone.patch_size=4", "method.decoder_dim=64",
                                        "method.decoder_depth=1")],
                         ids=["simclr", "moco_v3", "mae"])
def test_flops_per_image_counts_the_whole_training_step(make_cfg, overrides):
    """The Throughput callback's count of the first training step, per image, equals a count of the same
    work done by hand on the same views: the method's forward on every view (momentum encoder included)
    and the online probe, then the backward of their summed loss."""
    cfg = make_cfg("data=synthetic", *overrides, "data.batch_size=16", "trainer.accelerator=cpu", "eval.enabled=false")
    dm = SSLDataModule(cfg.data)
    dm.setup()
    model = build_method(cfg, dm.num_classes)
    throughput, keep = Throughput(), _KeepBatch()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[throughput, keep])
    trainer.fit(model, datamodule=dm)
    views, labels, _ = keep.batch
    model.train()
    with FlopCounterMode(display=False) as by_hand:
        out = model.forward_views(views)
        probe_loss, _, _ = model.online_probe(out["feats"], labels)
        (out["loss"] + probe_loss).backward()
    assert len(labels) == 16
    assert throughput.flops_per_image == by_hand.get_total_flops() / 16
    # a step does more than one forward of the backbone on one view: forward and backward of every view;
    # MAE's encoder sees a quarter of the tokens, but its online probe runs a no-grad full-image forward too
    with FlopCounterMode(display=False) as one_view:
        model.backbone(views[0][:1])
    assert throughput.flops_per_image > (1 if cfg.method.name == "mae" else 2) * one_view.get_total_flops()


def test_mfu_uses_the_dense_peak_of_known_devices_only(monkeypatch):
    assert peak_chip("NVIDIA H100 80GB HBM3") == "h100_sxm" and peak_chip("NVIDIA H100 PCIe") == "h100_pcie"
    assert peak_chip("NVIDIA H200") == "h200" and peak_chip("NVIDIA A100-SXM4-80GB") == "a100"
    assert peak_chip("NVIDIA A100 80GB PCIe") == "a100"
    for unknown in ("NVIDIA H100 NVL", "NVIDIA H200 NVL", "Tesla T4", "NVIDIA GeForce RTX 4090", "Intel(R) Xeon(R)"):
        assert peak_chip(unknown) is None, unknown
    assert compute_dtype("bf16-mixed") == "bf16" and compute_dtype("16-mixed") == "fp16"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert compute_dtype("32-true") == "tf32"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert compute_dtype("32-true") == "fp32"

    t = Throughput()
    t.world_size, t.images, t.seconds, t.flops_per_image = 8, 8 * 2000 * 10, 10.0, 4.1e9
    t.peak, t.dtype = PEAK_FLOPS["h200"]["bf16"], "bf16"
    s = t.summary()
    assert s["train_images_per_second"] == 16000 and s["train_images_per_second_per_device"] == 2000
    assert s["mfu"] == round(4.1e9 * 2000 / 989.4e12, 4) and s["peak_flops_dtype"] == "bf16"
    t.peak = None  # a device without a known peak: MFU left out, not guessed
    assert "mfu" not in t.summary() and "device_peak_flops" not in t.summary()
    assert math.isclose(PEAK_FLOPS["a100"]["tf32"], 156e12)


def test_suite_callbacks_stay_on_with_config_callbacks(tmp_path, make_cfg):
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ssl_vision.data import SkippedFilesReport
    from ssl_vision.train import build_trainer

    trainer, throughput = build_trainer(make_cfg(*QUICK, LR_MONITOR), tmp_path)
    kinds = [type(c) for c in trainer.callbacks]
    for kind in (LastCheckpoint, Throughput, SkippedFilesReport, LearningRateMonitor):
        assert kind in kinds, kinds
    assert throughput in trainer.callbacks
