"""Provenance in summary.json: the git commit when run from a checkout, nothing (and no error) otherwise;
package, library and device facts from the Trainer (the full summary is checked in test_callbacks_config)."""

import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import torch

import ssl_vision
from ssl_vision.train import git_commit, provenance

PACKAGE = Path(ssl_vision.__file__).resolve().parent


def test_git_commit_of_this_checkout():
    head = subprocess.run(["git", "-C", str(PACKAGE), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    found = git_commit()
    assert found["git_commit"] == head and re.fullmatch(r"[0-9a-f]{40}", head)
    dirty = subprocess.run(["git", "-C", str(PACKAGE), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found["git_dirty"] == bool(dirty)


def test_no_commit_and_no_error_outside_a_checkout(tmp_path, monkeypatch):
    installed = tmp_path / "site-packages" / "ssl_vision"  # an installed copy: no repository around it
    shutil.copytree(PACKAGE, installed, ignore=shutil.ignore_patterns("__pycache__"))
    assert git_commit(installed) == {}
    # inside some other repository (e.g. a virtual environment within a project): not this project's commit
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_commit(installed) == {}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git at all
    assert git_commit() == {}


def test_provenance_names_versions_devices_and_precision():
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    p = provenance(trainer)
    assert p["ssl_vision_version"] == ssl_vision.__version__ and p["precision"] == "bf16-mixed"
    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["lightning"] == L.__version__
    for package in ("timm", "kornia"):
        assert re.match(r"\d+\.\d+", p["versions"][package]), package
    assert p["accelerator"] == "cpu" and p["world_size"] == 1 and list(p["devices"].values()) == [1]
