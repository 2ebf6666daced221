import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from ssl_vision.config import conf_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def make_cfg():
    """Compose the training config with overrides, as the CLI would."""

    def _make(*overrides, config_name="train"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))

    return _make


TINY = ("data=synthetic", "backbone=resnet18_tiny", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "eval.linear.epochs=5")
