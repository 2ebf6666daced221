"""The momentum (EMA) encoder machinery of the base class, as MoCo v2/v3 use it."""

import math

import lightning as L
import torch
from torch import nn

import ssl_vision.methods.base as base
from ssl_vision.data import SSLDataModule
from ssl_vision.methods import build_method
from ssl_vision.methods.base import cosine_momentum, ema_update

SMALL = ("data=synthetic", "backbone=resnet18_tiny", "data.batch_size=32", "method.proj_hidden_dim=64",
         "method.proj_output_dim=32", "method.pred_hidden_dim=64")


def small_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_ema_update_formula_on_parameters_and_bn_keeps_own_statistics():
    online, target = small_net(0), small_net(1)
    target[1].running_mean.fill_(0.5)
    target[1].running_var.fill_(2.0)
    online[1].running_mean.fill_(-1.0)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    ema_update(online, target, 0.9)
    for (n, po), (_, pt) in zip(online.named_parameters(), target.named_parameters()):
        assert torch.allclose(pt, 0.9 * before[n] + 0.1 * po.detach(), atol=1e-7), n
    assert torch.equal(target[1].running_mean, torch.full((4,), 0.5))  # buffers are not averaged
    assert torch.equal(target[1].running_var, torch.full((4,), 2.0))
    ema_update(online, target, 1.0)  # momentum 1: no change
    ema_update(online, target, 0.0)  # momentum 0: a copy
    for po, pt in zip(online.parameters(), target.parameters()):
        assert torch.equal(po, pt)


def test_cosine_momentum_schedule_end_points():
    m0, total = 0.99, 100
    assert cosine_momentum(0, total, m0) == m0
    assert cosine_momentum(total, total, m0) == 1.0
    assert cosine_momentum(2 * total, total, m0) == 1.0  # stays at 1 past the end
    assert math.isclose(cosine_momentum(50, total, m0), (1 + m0) / 2, rel_tol=1e-12)
    values = [cosine_momentum(s, total, m0) for s in range(total + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert math.isclose(cosine_momentum(25, total, m0), 1 - (1 - m0) * (math.cos(math.pi / 4) + 1) / 2)


def test_momentum_copy_is_frozen_equal_and_outside_the_optimizer(make_cfg):
    model = build_method(make_cfg("method=moco_v3", *SMALL), 4)
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    target = list(model.momentum_backbone.parameters()) + list(model.momentum_projector.parameters())
    assert len(online) == len(target)
    for po, pt in zip(online, target):
        assert not pt.requires_grad and torch.equal(po, pt) and po.data_ptr() != pt.data_ptr()
    in_optimizer = {id(p) for g in model.param_groups() for p in g["params"]}
    assert not in_optimizer & {id(p) for p in target}
    assert {id(p) for p in model.predictor.parameters()} <= in_optimizer
    # the EMA weights are part of the checkpointed state
    keys = model.state_dict().keys()
    assert any(k.startswith("momentum_backbone.") for k in keys)
    assert any(k.startswith("momentum_projector.") for k in keys)


def test_ema_runs_once_per_optimizer_step_under_accumulation(make_cfg, monkeypatch):
    cfg = make_cfg("method=moco_v3", *SMALL, "method.momentum=0.9")
    calls = []
    real = base.ema_update

    def counting(online, target, m):
        calls.append(m)
        real(online, target, m)

    monkeypatch.setattr(base, "ema_update", counting)
    torch.manual_seed(0)
    model = build_method(cfg, 4)
    init_bn = model.momentum_backbone.bn1.running_mean.clone()
    dm = SSLDataModule(cfg.data)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    # 4 batches, 2 optimizer steps: 2 updates of each of the 2 (backbone, projector) pairs, with the
    # momentum of the cosine schedule at steps 1 and 2 of 2 (the end point: 1)
    expected = [cosine_momentum(1, 2, 0.9)] * 2 + [1.0] * 2
    assert calls == expected
    # the momentum encoder ran its own forward passes, so its BN statistics are its own
    assert not torch.equal(model.momentum_backbone.bn1.running_mean, init_bn)
    assert not torch.equal(model.momentum_backbone.bn1.running_mean, model.backbone.bn1.running_mean)


def test_ema_update_is_two_multi_tensor_ops_whatever_the_number_of_parameters():
    """torch._foreach_*: two kernels per step for all parameters, not two per parameter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    online, target = small_net(0), small_net(1)
    assert len(list(online.parameters())) == 6
    with Ops() as ops:
        ema_update(online, target, 0.9)
    assert [n for n in ops.names if n != "detach"] == ["_foreach_mul_", "_foreach_add_"]
