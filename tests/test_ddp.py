"""Distributed correctness on the CPU: 2 gloo ranks with B/2 samples each must equal 1 rank with B.

Each method takes one optimizer step from the same initial weights on the same augmented views;
the averaged loss, the updated weights (and EMA encoder, and the MoCo v2 queue) must match the
single-process step on the concatenated batch. Gradients are averaged over ranks exactly as DDP
does. BatchNorm layers are put in eval mode: torch has no CPU SyncBatchNorm, and per-rank batch
statistics would differ from full-batch ones by construction (on GPUs, trainer=ddp converts them).
The offline probes must give the same accuracy on 2 ranks as on 1.
"""

import os

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from torch import nn

from ssl_vision.config import conf_dir

B = 8
COMMON = ["data=synthetic", "data.image_size=16", "backbone=vit_tiny", "backbone.patch_size=4",
          "+backbone.kwargs.depth=2", "eval.linear.epochs=5"]
METHODS = {
    "simclr": ["method=simclr", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    "moco_v2": ["method=moco_v2", "method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.queue_size=16"],
    "moco_v3": ["method=moco_v3", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                "method.pred_hidden_dim=32"],
    "mae": ["method=mae", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
}


def make_cfg(overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="train", overrides=COMMON + overrides)


def fixed_inputs():
    g = torch.Generator().manual_seed(123)
    views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
    noise = torch.rand(B, 16, generator=g)  # MAE's masking noise, one row per sample
    return views, noise


def one_step(name, rank=0, world=1):
    """One SGD step of ``name`` on this rank's share of the fixed batch; returns (loss, state)."""
    from ssl_vision.methods import build_method, mae
    from ssl_vision.methods.base import ema_update

    views, noise = fixed_inputs()
    n = B // world
    local = [v[rank * n:(rank + 1) * n] for v in views]
    torch.manual_seed(0)
    model = build_method(make_cfg(METHODS[name]), num_classes=0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    original = mae.random_masking
    mae.random_masking = lambda x, ratio, **kw: original(x, ratio, noise=noise[rank * n:(rank + 1) * n])
    try:
        out = model.forward_views(local)
    finally:
        mae.random_masking = original
    params = [p for p in model.parameters() if p.requires_grad]
    out["loss"].backward()
    loss = out["loss"].detach()
    if world > 1:  # what DDP does: average the gradients (and, for the report, the losses)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
        dist.all_reduce(loss)
        loss /= world
    torch.optim.SGD(params, lr=0.5).step()
    for online, target in model._momentum_pairs:
        ema_update(online, target, 0.9)
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


def probe_metrics():
    from ssl_vision.augment import EvalTransform
    from ssl_vision.backbones import build_backbone
    from ssl_vision.data import SSLDataModule
    from ssl_vision.evaluation import evaluate_backbone

    cfg = make_cfg(METHODS["simclr"])
    dm = SSLDataModule(cfg.data)
    dm.setup()
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_tiny", 16)
    return evaluate_backbone(backbone, dm, EvalTransform(16, [0.5] * 3, [0.5] * 3), cfg.eval)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: one_step(name, rank, world) for name in METHODS}
        results["probe"] = probe_metrics()
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_for_every_method(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    for name in METHODS:
        loss, state = one_step(name)
        d_loss, d_state = ddp[name]
        assert torch.allclose(loss, d_loss, atol=1e-5), (name, loss, d_loss)
        assert state.keys() == d_state.keys()
        for key in state:
            assert torch.allclose(state[key].float(), d_state[key].float(), atol=1e-5), (name, key)
    single = probe_metrics()
    assert single == ddp["probe"]


def test_cli_ddp_run_on_two_cpu_processes(tmp_path):
    """The real launcher path: Lightning starts 2 gloo processes; rank 0 alone writes the summary; the lr
    follows the global batch; the end-of-run probes equal a 1-process evaluation of the saved backbone."""
    import json
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from ssl_vision.data import SSLDataModule
    from ssl_vision.evaluation import backbone_from_checkpoint, evaluate_backbone, load_checkpoint
    from ssl_vision.methods import build_method

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ssl_vision.train", "trainer=ddp", "trainer.devices=2",
                        "trainer.accelerator=cpu", "data=synthetic", "backbone=resnet18_tiny", "trainer.max_epochs=1",
                        "eval.linear.epochs=5", "eval.random_init_baseline=false", "plots=false",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("summary.json")] == [run.relative_to(tmp_path) / "summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and r.stdout.count('"world_size": 2') == 1  # printed by rank 0 only
    assert summary["steps"] == 384 // (2 * 64)  # 384 training images, 64 per rank per step, drop_last
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    lrs = {g["name"]: g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert lrs["decay"] == lrs["no_decay"] == pytest.approx(0.4 * 128 / 256)  # base lr x global batch / 256
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    dm = SSLDataModule(cfg.data)
    dm.setup()
    backbone, _ = backbone_from_checkpoint(ckpt)
    single = evaluate_backbone(backbone, dm, build_method(cfg, dm.num_classes).eval_transform, cfg.eval)
    for key in ("linear_probe_top1", "linear_probe_top5", "knn_top1"):
        assert summary[key] == single[key], key


# --- BYOL, SimSiam, Barlow Twins, VICReg, DINO: 2 ranks x B/2 == 1 rank x B (loss, weights, EMA teacher,
# DINO centre); and the same step with per-rank statistics (the gathers replaced by the identity) must NOT
# match, which shows that Barlow Twins' and VICReg's batch statistics and DINO's centre are global ------

NEW_METHODS = {
    "byol": ["method=byol", "method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32"],
    "simsiam": ["method=simsiam", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                "method.pred_hidden_dim=8"],
    "barlow_twins": ["method=barlow_twins", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    "vicreg": ["method=vicreg", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    # 2 global views of 16 px + 2 local views of 8 px; the ViT interpolates its position embedding
    "dino": ["method=dino", "method.hidden_dim=32", "method.bottleneck_dim=16", "method.out_dim=64",
             "+backbone.kwargs.dynamic_img_size=true", "augment.views.local1.size=8", "augment.views.local2.size=8",
             "method.norm_last_layer=false", "method.freeze_last_layer=0"]
            + [f"~augment.views.local{i}" for i in range(3, 9)],
}
PER_RANK_GATHER = {"barlow_twins": "gather_with_grad", "vicreg": "gather_with_grad", "dino": "gather_no_grad"}


def one_step_new(name, rank=0, world=1, per_rank=False):
    """One SGD step of ``name`` on this rank's share of fixed views; ``per_rank``: with the method's gather
    replaced by the identity (statistics of this rank's samples only)."""
    import importlib

    from ssl_vision.methods import build_method
    from ssl_vision.methods.base import ema_update

    g = torch.Generator().manual_seed(7)
    sizes = (16, 16, 8, 8) if name == "dino" else (16, 16)
    views = [torch.randn(B, 3, s, s, generator=g) for s in sizes]
    n = B // world
    local = [v[rank * n:(rank + 1) * n] for v in views]
    torch.manual_seed(0)
    model = build_method(make_cfg(NEW_METHODS[name]), num_classes=0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    module = importlib.import_module(f"ssl_vision.methods.{name}")
    gather = PER_RANK_GATHER.get(name)
    original = getattr(module, gather) if gather else None
    if per_rank:
        setattr(module, gather, lambda x: x)
    try:
        out = model.forward_views(local)
    finally:
        if per_rank:
            setattr(module, gather, original)
    params = [p for p in model.parameters() if p.requires_grad]
    out["loss"].backward()
    loss = out["loss"].detach()
    if world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
        dist.all_reduce(loss)
        loss /= world
    model.on_before_optimizer_step(None)  # DINO: per-parameter clipping (and last-layer freeze when set)
    torch.optim.SGD(params, lr=0.5).step()
    for online, target in model._momentum_pairs:
        ema_update(online, target, 0.9)
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker_new(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: one_step_new(name, rank, world) for name in NEW_METHODS}
        results.update({f"{name}/per_rank": one_step_new(name, rank, world, per_rank=True) for name in PER_RANK_GATHER})
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp_new.pt"))
    finally:
        dist.destroy_process_group()


def _max_difference(a, b):
    (loss_a, state_a), (loss_b, state_b) = a, b
    return max([float((loss_a - loss_b).abs())] + [float((state_a[k].float() - state_b[k].float()).abs().max())
                                                   for k in state_a])


def test_two_ranks_equal_one_rank_for_byol_simsiam_barlow_twins_vicreg_dino(tmp_path):
    mp.spawn(_worker_new, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp_new.pt", weights_only=False)
    for name in NEW_METHODS:
        single = one_step_new(name)
        assert single[1].keys() == ddp[name][1].keys()
        assert _max_difference(single, ddp[name]) < 1e-5, name
        if name in ("byol", "dino"):  # the EMA target is its own network: not the online one after a step
            online, target = ("backbone", "momentum_backbone") if name == "byol" else ("student_backbone", "backbone")
            key = "blocks.0.mlp.fc1.weight"
            assert not torch.allclose(single[1][f"{online}.{key}"], single[1][f"{target}.{key}"], atol=1e-4)
        if name == "dino":
            assert single[1]["center"].abs().sum() > 0 and torch.allclose(single[1]["center"], ddp[name][1]["center"],
                                                                       atol=1e-7)
    # statistics of each rank's own samples give another step: the comparison above would catch them
    for name in PER_RANK_GATHER:
        assert _max_difference(one_step_new(name), ddp[f"{name}/per_rank"]) > 1e-3, name
