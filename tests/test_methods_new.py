"""BYOL, SimSiam, Barlow Twins, VICReg and DINO: heads, each step against a reference computed here from
the paper's pseudocode, the networks each evaluates, their schedules, and a short Lightning run each."""


import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import ssl_vision.methods.base as base
from ssl_vision.config import ConfigError
from ssl_vision.data import SSLDataModule
from ssl_vision.evaluation import backbone_from_checkpoint
from ssl_vision.methods import build_method
from ssl_vision.methods.barlow_twins import BarlowTwins
from ssl_vision.methods.byol import BYOL
from ssl_vision.methods.dino import DINO, WeightNormLinear, cosine_schedule, teacher_temperature
from ssl_vision.methods.simsiam import SimSiam
from ssl_vision.methods.vicreg import VICReg
from ssl_vision.optim import warmup_cosine

from .test_losses import reference_barlow, reference_dino, reference_vicreg

DATA = ("data=synthetic", "backbone=resnet18_tiny", "data.batch_size=16")
SMALL = {
    "byol": ("method=byol", "method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32"),
    "simsiam": ("method=simsiam", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                "method.pred_hidden_dim=8"),
    "barlow_twins": ("method=barlow_twins", "method.proj_hidden_dim=32", "method.proj_output_dim=16"),
    "vicreg": ("method=vicreg", "method.proj_hidden_dim=32", "method.proj_output_dim=16"),
    "dino": ("method=dino", "method.hidden_dim=32", "method.bottleneck_dim=16", "method.out_dim=64"),
}


def views(n=2, b=16, sizes=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for s in sizes[:n]]


def fit(model, steps=2, **kwargs):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, **kwargs)
    trainer.fit(model, datamodule=SSLDataModule(model.cfg.data))
    return trainer


def layer_types(seq):
    return [type(m) for m in seq]


def optimized(model):
    return {id(p) for g in model.param_groups() for p in g["params"]}


# --- BYOL -------------------------------------------------------------------------------------------------

def test_byol_heads_target_and_evaluated_network(make_cfg):
    model = build_method(make_cfg("method=byol", *DATA), 4)
    assert isinstance(model, BYOL)
    for head, dims in ((model.projector, (512 // 4, 4096, 256)), (model.predictor, (256, 4096, 256))):
        assert layer_types(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[3].out_features) == dims
    assert model._momentum_pairs == [(model.backbone, model.momentum_backbone),
                                     (model.projector, model.momentum_projector)]
    target = list(model.momentum_backbone.parameters()) + list(model.momentum_projector.parameters())
    assert not any(p.requires_grad for p in target) and not optimized(model) & {id(p) for p in target}
    assert {id(p) for p in model.backbone.parameters()} <= optimized(model)  # the online net is evaluated
    assert model.cfg.method.momentum == 0.996 and model.cfg.optimizer.name == "lars"


def test_byol_step_is_the_symmetric_loss_of_online_predictions_and_target_projections(make_cfg):
    torch.manual_seed(0)
    model = build_method(make_cfg(*SMALL["byol"], *DATA), 4)
    with torch.no_grad():  # a target different from the online network
        for p in model.momentum_projector.parameters():
            p.add_(0.1 * torch.randn_like(p))
    v = views()
    out = model.forward_views(v)
    p = [model.predictor(model.projector(model.backbone(x))) for x in v]
    t = [model.momentum_projector(model.momentum_backbone(x)).detach() for x in v]

    def reg(a, b):  # byol/utils/helpers.py regression_loss, batch mean
        return ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()

    assert torch.allclose(out["loss"], reg(p[0], t[1]) + reg(p[1], t[0]), atol=1e-5)
    assert not torch.allclose(out["loss"], reg(p[0], t[0]) + reg(p[1], t[1]), atol=1e-3)
    out["loss"].backward()
    assert all(p.grad is None for p in model.momentum_backbone.parameters())
    assert model.predictor[0].weight.grad.abs().sum() > 0 and model.backbone.conv1.weight.grad.abs().sum() > 0
    assert torch.allclose(out["feats"], model.backbone(v[0]), atol=1e-6)  # online features, as evaluated
    assert torch.allclose(out["embedding"], model.projector(model.backbone(v[0])), atol=1e-6)


# --- SimSiam ----------------------------------------------------------------------------------------------

def test_simsiam_heads_follow_the_reference(make_cfg):
    model = build_method(make_cfg("method=simsiam", *DATA), 4)
    assert isinstance(model, SimSiam)
    proj = model.projector
    assert layer_types(proj) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert proj[6].bias is None and not proj[7].affine and proj[6].out_features == 2048
    assert all(m.bias is None for m in (proj[0], proj[3]))
    pred = model.predictor
    assert layer_types(pred) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (2048, 512, 2048)
    assert pred[0].bias is None and pred[3].bias is not None
    assert not model._momentum_pairs
    assert len(build_method(make_cfg("method=simsiam", *DATA, "method.proj_layers=2"), 4).projector) == 5


def test_simsiam_step_is_the_negative_cosine_with_stop_gradient(make_cfg):
    torch.manual_seed(0)
    model = build_method(make_cfg(*SMALL["simsiam"], *DATA), 4)
    v = views()
    out = model.forward_views(v)
    z = [model.projector(model.backbone(x)) for x in v]
    p = [model.predictor(x) for x in z]
    expected = -(F.cosine_similarity(p[0], z[1].detach()).mean() + F.cosine_similarity(p[1], z[0].detach()).mean()) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    # stop-gradient: the projector's gradient is the one through the predictor only
    grads = torch.autograd.grad(out["loss"], list(model.projector.parameters()), retain_graph=True)
    through_z = -(F.cosine_similarity(p[0].detach(), z[1]).mean() + F.cosine_similarity(p[1].detach(), z[0]).mean()) / 2
    full = torch.autograd.grad(expected + through_z, list(model.projector.parameters()))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, full))


def test_simsiam_predictor_lr_stays_fixed_while_the_rest_follows_the_schedule(make_cfg):
    cfg = make_cfg(*SMALL["simsiam"], *DATA, "optimizer.warmup_epochs=0.5", "trainer.max_epochs=1")
    model = build_method(cfg, 4)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):  # the lr this step uses
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    trainer = fit(model, steps=4, callbacks=[Record()])
    base_lr = 0.05 * 16 / 256
    groups = trainer.optimizers[0].param_groups
    pred = {id(p) for p in model.predictor.parameters()}
    fixed = [g for g in groups if g.get("fixed_lr")]
    assert {g["name"] for g in fixed} == {"predictor_decay"}  # exclude_bias_norm: false, as the reference
    assert {id(p) for g in fixed for p in g["params"]} == pred
    assert all(r["predictor_decay"] == pytest.approx(base_lr) for r in lrs)
    total = trainer.estimated_stepping_batches  # 4 (max_steps), 2 of warm-up
    assert [r["decay"] for r in lrs] == pytest.approx([base_lr * warmup_cosine(s, 2, total) for s in range(4)])
    assert lrs[0]["decay"] < base_lr and lrs[-1]["decay"] < base_lr


# --- Barlow Twins -----------------------------------------------------------------------------------------

def test_barlow_twins_projector_lr_groups_and_step(make_cfg):
    torch.manual_seed(0)
    model = build_method(make_cfg(*SMALL["barlow_twins"], *DATA), 4)
    assert isinstance(model, BarlowTwins)
    assert layer_types(model.projector) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert all(m.bias is None for m in model.projector if isinstance(m, nn.Linear))
    lrs = {g["name"]: g["lr"] for g in model.param_groups()}
    assert lrs["decay"] == pytest.approx(0.2 * 16 / 256) and lrs["no_decay"] == pytest.approx(0.0048 * 16 / 256)
    v = views()
    out = model.forward_views(v)
    with torch.no_grad():
        z1, z2 = (model.projector(model.backbone(x)) for x in v)
    assert abs(out["loss"].item() - reference_barlow(z1, z2, 0.0051)) < 1e-3
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    defaults = build_method(make_cfg("method=barlow_twins", *DATA), 4).cfg.method
    assert (defaults.lambd, defaults.proj_output_dim, defaults.scale_loss) == (0.0051, 8192, 1.0)


# --- VICReg -----------------------------------------------------------------------------------------------

def test_vicreg_expander_coefficients_and_step(make_cfg):
    torch.manual_seed(0)
    model = build_method(make_cfg(*SMALL["vicreg"], *DATA), 4)
    assert isinstance(model, VICReg)
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert layer_types(model.projector) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert linears[-1].bias is None
    m = build_method(make_cfg("method=vicreg", *DATA), 4).cfg.method
    assert (m.sim_coeff, m.std_coeff, m.cov_coeff, m.proj_output_dim) == (25.0, 25.0, 1.0, 8192)
    v = views()
    out = model.forward_views(v)
    z1, z2 = (model.projector(model.backbone(x)).detach() for x in v)
    assert abs(out["loss"].item() - reference_vicreg(z1, z2, 25.0, 25.0, 1.0)[0]) < 1e-3


# --- DINO -------------------------------------------------------------------------------------------------

def small_multicrop(cfg, local_size=8, locals_kept=4):
    """dino.yaml's 8 local views of 96 px -> ``locals_kept`` of ``local_size`` px (the test images are 16 px)."""
    OmegaConf.set_struct(cfg, False)
    for i in range(1, 9):
        if i > locals_kept:
            del cfg.augment.views[f"local{i}"]
        else:
            cfg.augment.views[f"local{i}"].size = local_size
    OmegaConf.set_struct(cfg, True)
    return cfg


def dino_model(make_cfg, *extra, backbone=("backbone=resnet18_tiny",)):
    torch.manual_seed(0)
    cfg = make_cfg(*SMALL["dino"], "data=synthetic", "data.batch_size=16", *backbone, *extra)
    return build_method(small_multicrop(cfg), 4)


def test_dino_head_is_the_reference_head(make_cfg):
    model = build_method(small_multicrop(make_cfg("method=dino", *DATA)), 4)
    assert isinstance(model, DINO)
    head = model.head
    assert layer_types(head.mlp) == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [2048, 2048, 256]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in head.mlp if isinstance(m, nn.Linear))
    assert abs(float(head.mlp[2].weight.detach().std()) - 0.02) < 1e-3  # trunc_normal(std=.02)
    assert head.last_layer.weight_v.shape == (65536, 256) and torch.equal(head.last_layer.weight_g,
                                                                          torch.ones(65536, 1))
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer: the norms stay 1
    assert id(head.last_layer.weight_g) not in optimized(model)
    assert layer_types(build_method(small_multicrop(make_cfg(*SMALL["dino"], *DATA, "method.use_bn_in_head=true",
                                                             "method.norm_last_layer=false")), 4).head.mlp)[:3] == \
        [nn.Linear, nn.BatchNorm1d, nn.GELU]
    # the bottleneck is L2-normalized; the last layer is torch's weight norm (dim 0) with the same v and g
    lin = WeightNormLinear(16, 10)
    with torch.no_grad():
        lin.weight_g.uniform_(0.5, 2.0)
    ref = torch.nn.utils.parametrizations.weight_norm(nn.Linear(16, 10, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(lin.weight_g)
        ref.parametrizations.weight.original1.copy_(lin.weight_v)
    x = torch.randn(5, 16)
    assert torch.allclose(lin(x), ref(x), atol=1e-6)
    small = dino_model(make_cfg)
    feats = torch.randn(4, small.feat_dim)
    assert torch.allclose(small.head.bottleneck(feats).norm(dim=1), torch.ones(4))
    assert torch.allclose(small.head(feats), small.head.last_layer(F.normalize(small.head.mlp(feats), dim=-1)))


def test_dino_teacher_temperature_and_weight_decay_schedules_are_the_reference_arrays():
    warm, temp, warm_epochs, epochs = 0.04, 0.07, 30, 100
    ref = np.concatenate((np.linspace(warm, temp, warm_epochs), np.ones(epochs - warm_epochs) * temp))
    assert np.allclose([teacher_temperature(e, warm, temp, warm_epochs) for e in range(epochs)], ref)
    assert teacher_temperature(0, warm, temp, 0) == temp and teacher_temperature(0, warm, temp, 1) == warm
    total = 50  # utils.cosine_scheduler(0.04, 0.4, epochs, niter) without warm-up
    ref = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * np.arange(total) / total))
    assert np.allclose([cosine_schedule(s, total, 0.04, 0.4) for s in range(total)], ref)


def test_dino_multicrop_step_matches_the_reference(make_cfg):
    """2 x 32 px global + 4 x 16 px local views: the student sees all six, the teacher the two globals; the
    loss is DINOLoss over the 10 pairs of different views with the old centre, then the centre moves."""
    model = dino_model(make_cfg)
    model.eval()  # BatchNorm on running statistics: the per-view reference below sees the same numbers
    with torch.no_grad():
        model.center.normal_(0, 0.1)
        for p in model.teacher_head.parameters():  # a teacher different from the student
            p.add_(0.05 * torch.randn_like(p))
    assert model.augment.num_global == 2
    v = views(6, 8, sizes=(32, 32, 16, 16, 16, 16))  # explicit tensors: 2 x 32 px + 4 x 16 px
    seen = {"student": [], "teacher": []}
    model.student_backbone.register_forward_hook(lambda m, a, o: seen["student"].append(tuple(a[0].shape)))
    model.backbone.register_forward_hook(lambda m, a, o: seen["teacher"].append(tuple(a[0].shape)))
    center = model.center.clone()
    out = model.forward_views(v)
    # MultiCropWrapper: one call per resolution; the teacher: the global views only
    assert seen == {"student": [(16, 3, 32, 32), (32, 3, 16, 16)], "teacher": [(16, 3, 32, 32)]}
    with torch.no_grad():
        student = [model.head(model.student_backbone(x)) for x in v]
        teacher = [model.teacher_head(model.backbone(x)) for x in v[:2]]
    m = model.cfg.method
    expected = reference_dino(student, teacher, center, m.student_temp, m.warmup_teacher_temp)  # epoch 0
    assert abs(float(out["loss"]) - expected) < 1e-4
    batch_center = torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(model.center, 0.9 * center + 0.1 * batch_center, atol=1e-6)
    assert torch.allclose(out["feats"], model.backbone(v[0]), atol=1e-5)  # the probe reads the teacher
    out["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.student_backbone.conv1.weight.grad.abs().sum() > 0


def test_dino_evaluates_and_exports_the_teacher(make_cfg):
    model = dino_model(make_cfg)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert {id(p) for p in model.student_backbone.parameters()} <= optimized(model)
    assert (model.student_backbone, model.backbone) in model._momentum_pairs
    with torch.no_grad():
        for p in model.student_backbone.parameters():
            p.add_(1.0)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": model.hparams}
    backbone, _ = backbone_from_checkpoint(ckpt)
    teacher = dict(model.backbone.state_dict())
    assert all(torch.equal(v, teacher[k]) for k, v in backbone.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model.backbone(x))


def test_dino_freezes_the_last_layer_in_epoch_0_clips_each_gradient_and_schedules_weight_decay(make_cfg):
    model = dino_model(make_cfg, "method.norm_last_layer=false", "method.clip_grad=0.5", "trainer.max_epochs=2",
                       "data.num_samples=64", "optimizer.weight_decay=0.04", "method.weight_decay_end=0.4")
    snapshots, wds = [], []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            wds.append({g["name"]: g["weight_decay"] for g in optimizer.param_groups})

        def on_train_epoch_end(self, trainer, module):
            snapshots.append([p.detach().clone() for p in module.head.last_layer.parameters()])

    start = [p.detach().clone() for p in model.head.last_layer.parameters()]
    mlp = model.head.mlp[0].weight.detach().clone()
    trainer = fit(model, steps=-1, max_epochs=2, callbacks=[Record()])  # 2 epochs of 3 steps
    assert all(torch.equal(a, b) for a, b in zip(start, snapshots[0]))  # epoch 0: frozen
    assert all(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # epoch 1: trained
    assert not torch.equal(mlp, model.head.mlp[0].weight)
    total = trainer.estimated_stepping_batches  # utils.cosine_scheduler(wd, wd_end, ...) of the regularized group
    assert [w["decay"] for w in wds] == pytest.approx([cosine_schedule(s, total, 0.04, 0.4) for s in range(total)])
    assert all(w["no_decay"] == 0.0 for w in wds)
    # per-parameter clipping (utils.clip_gradients), not a global norm
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    small = model.head.mlp[0].bias
    small.grad = torch.full_like(small, 1e-3)
    model.on_before_optimizer_step(None)
    for p in list(model.student_backbone.parameters()) + list(model.head.parameters()):
        if p.grad is not None:
            assert float(p.grad.norm()) <= 0.5 + 1e-5
    assert torch.equal(small.grad, torch.full_like(small, 1e-3))  # under the threshold: untouched


def test_dino_vit_multicrop_needs_dynamic_image_size(make_cfg):
    vit = ("backbone=vit_tiny", "backbone.patch_size=4", "+backbone.kwargs.depth=2",
           "+backbone.kwargs.dynamic_img_size=true", "+backbone.kwargs.drop_path_rate=0.1", "data.image_size=16")
    model = dino_model(make_cfg, backbone=vit)
    assert all(m.drop_prob == 0 for m in model.backbone.modules() if hasattr(m, "drop_prob"))  # teacher
    assert any(m.drop_prob > 0 for m in model.student_backbone.modules() if hasattr(m, "drop_prob"))
    out = model.forward_views(views(4, 4, sizes=(16, 16, 8, 8)))
    assert torch.isfinite(out["loss"])


def test_dino_needs_two_global_views_and_a_vit_that_takes_small_ones(make_cfg):
    for cfg in (small_multicrop(make_cfg(*SMALL["dino"], *DATA, "~augment.views.global2")),  # 1 global
                small_multicrop(make_cfg(*SMALL["dino"], *DATA), local_size=16)):  # locals as large as globals
        with pytest.raises(ConfigError) as e:
            build_method(cfg, 4)
        assert "\n" not in str(e.value) and "augment.views: DINO's teacher takes 2 global views" in str(e.value)
    vit = ("backbone=vit_tiny", "backbone.patch_size=4", "+backbone.kwargs.depth=1")
    with pytest.raises(ConfigError, match="dynamic_img_size=true"):
        build_method(small_multicrop(make_cfg(*SMALL["dino"], "data=synthetic", *vit)), 4)


def test_dino_recipes_without_local_crops_drop_them(make_cfg):
    """solo-learn's DINO scripts train on 2 crops: their recipes set dino.yaml's local views to null."""
    model = build_method(make_cfg("experiment=cifar10_dino_resnet18", "data=synthetic", "backbone=resnet18_tiny"), 4)
    assert model.augment.names == ["global1", "global2"] and model.augment.num_global == 2
    assert model.augment.views[0]["interpolation"] == "bicubic" and model.augment.views[1]["solarize_prob"] == 0.2


# --- a short Lightning run (BYOL, SimSiam and DINO have theirs above and below), collapse diagnostics ------

@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_each_method_trains_in_lightning(make_cfg, name):
    torch.manual_seed(0)
    cfg = make_cfg(*SMALL[name], *DATA)
    model = build_method(cfg, 4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = fit(model, steps=2)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss_step"])
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_collapse_diagnostics_are_logged_only_at_logging_steps(make_cfg, monkeypatch):
    calls, values = [], []
    real = base.rankme

    def recorded(x):
        calls.append(tuple(x.shape))
        values.append(real(x))
        return values[-1]

    monkeypatch.setattr(base, "rankme", recorded)
    model = build_method(make_cfg(*SMALL["byol"], *DATA), 4)
    trainer = fit(model, steps=5, log_every_n_steps=2)
    # steps 2 and 4 of 5 are written (global_step + 1 divisible by 2): features and embedding each time
    assert calls == [(16, 128), (16, 16)] * 2
    metrics = trainer.logged_metrics
    for key in ("diag/feats_std", "diag/feats_rankme", "diag/embedding_std", "diag/embedding_rankme"):
        assert key in metrics and torch.isfinite(metrics[key])
    # the logged values are the last logging step's RankMe of the features and of the embedding
    assert float(metrics["diag/feats_rankme"]) == pytest.approx(float(values[-2]))
    assert float(metrics["diag/embedding_rankme"]) == pytest.approx(float(values[-1]))
