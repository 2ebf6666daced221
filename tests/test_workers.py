"""``data.num_workers: auto``: loader workers from the CPUs this process may use (its affinity mask), capped;
the default of the file-based data options, while in-memory data keeps 0."""

import os

import pytest

from ssl_vision.config import ConfigError, group_options
from ssl_vision.data import SSLDataModule
from ssl_vision.data.datamodule import MAX_AUTO_WORKERS, loader_workers

from .test_data import write_png_tree

IN_MEMORY = {"cifar10", "cifar100", "digits", "synthetic"}


@pytest.mark.parametrize("cpus,expected", [(1, 0), (2, 1), (4, 3), (9, 8), (64, MAX_AUTO_WORKERS)])
def test_auto_is_one_fewer_than_the_cpus_this_process_may_use_capped(monkeypatch, cpus, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 256)  # the machine's count is not what this process may use
    assert loader_workers("auto") == expected
    assert loader_workers(3) == 3 and loader_workers(0) == 0


@pytest.mark.parametrize("bad", [-1, "four", 2.5, True])
def test_a_bad_worker_count_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"data.num_workers: must be an integer >= 0 or auto, got"):
        loader_workers(bad)


def test_file_based_data_defaults_to_auto_and_in_memory_data_to_zero(make_cfg):
    options = group_options("data")
    assert IN_MEMORY < set(options)
    for name in options:
        workers = make_cfg(f"data={name}").data.num_workers
        assert workers == (0 if name in IN_MEMORY else "auto"), (name, workers)


def test_the_loaders_use_the_auto_count(tmp_path, make_cfg, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    write_png_tree(tmp_path, per_class=4)
    dm = SSLDataModule(make_cfg("data=imagefolder", f"data.path={tmp_path}", "data.image_size=8",
                                "data.canvas_size=10", "data.batch_size=2").data)
    dm.setup()
    assert dm.train_dataloader().num_workers == 2
    assert all(loader.num_workers == 2 for loader in dm.probe_dataloaders())
