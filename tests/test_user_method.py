"""A method that lives outside the package (here: in this test file), chosen with ``method._target_``: it
trains with its own config keys, is probed, keeps its own ``method.name``, and bad targets are one line."""

import json

import pytest
import torch
import torch.nn.functional as F

from ssl_vision.config import ConfigError, check_overrides
from ssl_vision.methods import build_method
from ssl_vision.methods.base import SSLMethod, mlp
from ssl_vision.train import run

TARGET = f"{__name__}.TwoViewCosine"


class TwoViewCosine(SSLMethod):
    """A SimSiam-like toy: a projector and a predictor, the predicted view against the other view's
    projection (stopped gradient); its sizes and loss weight are its own ``method.*`` keys."""

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        m = cfg.method
        self.projector = mlp(self.feat_dim, int(m.hidden_dim), int(m.out_dim))
        self.predictor = mlp(int(m.out_dim), int(m.hidden_dim), int(m.out_dim))
        self.calls = 0

    def forward_views(self, views):
        self.calls += 1
        feats = [self.backbone(v) for v in views[:2]]
        z = [self.projector(f) for f in feats]
        p = [self.predictor(x) for x in z]
        loss = -(F.cosine_similarity(p[0], z[1].detach()).mean() + F.cosine_similarity(p[1], z[0].detach()).mean())
        return {"loss": float(self.cfg.method.weight) * loss / 2, "feats": feats[0]}


OVERRIDES = ("data=synthetic", "backbone=resnet18_tiny", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
             "data.batch_size=64", f"method._target_={TARGET}", "method.name=two_view_cosine",
             "+method.hidden_dim=32", "+method.out_dim=16", "+method.weight=1.0", "eval.linear.epochs=3",
             "eval.random_init_baseline=false", "plots=false")


def test_a_user_method_by_target_trains_and_is_probed(tmp_path, make_cfg):
    check_overrides(list(OVERRIDES), "train")  # method._target_ is a known key: no '+' needed
    cfg = make_cfg(*OVERRIDES, "trainer.max_epochs=1", f"+run_dir={tmp_path}")  # 6 steps, then validation
    model = build_method(cfg, 4)
    assert type(model) is TwoViewCosine and model.predictor[-1].out_features == 16
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("projector", "predictor"))}

    summary = run(cfg)
    assert summary["method"] == "two_view_cosine" and summary["steps"] == 6
    for key in ("linear_probe_top1", "knn_top1", "online_probe_top1"):  # probed, online and offline
        assert 0.0 <= summary[key] <= 1.0, key
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stored = ckpt["hyper_parameters"]["cfg"]["method"]
    assert stored["_target_"] == TARGET and stored["name"] == "two_view_cosine" and stored["out_dim"] == 16
    changed = [k for k, v in before.items() if not torch.equal(v, ckpt["state_dict"][k])]
    assert any(k.startswith("projector") for k in changed) and any(k.startswith("predictor") for k in changed)

    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "two_view_cosine"
    # the run's identity is method.name: resuming its run directory with a built-in method is refused
    with pytest.raises(ConfigError, match="was trained with method 'two_view_cosine', but this config has method "
                                          "'simclr'"):
        run(make_cfg("data=synthetic", "backbone=resnet18_tiny", "trainer.accelerator=cpu", f"+run_dir={tmp_path}"))


class NotAMethod:
    def __init__(self, cfg, num_classes):
        pass


@pytest.mark.parametrize("target,name,expected", [
    (f"{__name__}.NotAMethod", "x", f"method._target_: '{__name__}.NotAMethod' is not a subclass of "
                                    "ssl_vision.methods.base.SSLMethod"),
    ("no_such_package.Method", "x", "method._target_: cannot import 'no_such_package.Method' (ModuleNotFoundError: "
                                    "No module named 'no_such_package'); is its module installed or on PYTHONPATH?"),
    (f"{__name__}.Missing", "x", f"method._target_: cannot import '{__name__}.Missing' (AttributeError: "),
    (TARGET, "simclr", "method.name: 'simclr' is the built-in SimCLR; give TwoViewCosine its own name"),
])
def test_a_bad_target_is_one_line(make_cfg, target, name, expected):
    cfg = make_cfg("data=synthetic", "backbone=resnet18_tiny", f"method._target_={target}", f"method.name={name}")
    with pytest.raises(ConfigError) as e:
        build_method(cfg, 4)
    assert "\n" not in str(e.value) and str(e.value).startswith(expected), str(e.value)


def test_a_built_in_class_by_target_is_that_method(make_cfg):
    cfg = make_cfg("data=synthetic", "backbone=resnet18_tiny", "method._target_=ssl_vision.methods.simclr.SimCLR")
    assert type(build_method(cfg, 4)).__name__ == "SimCLR"
