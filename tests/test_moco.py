"""MoCo v2 and v3: losses against hand-written references, heads, queue, checkpoints, ranks."""

import math
import os
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.config import ConfigError
from ssl_vision.data import SSLDataModule
from ssl_vision.losses import moco_v2_loss, moco_v3_ctr, moco_v3_loss
from ssl_vision.methods import build_method
from ssl_vision.methods.moco import MoCoV2, MoCoV3
from ssl_vision.pos_embed import sincos_2d

V2 = ("method=moco_v2", "data=synthetic", "backbone=resnet18_tiny", "data.batch_size=32",
      "method.proj_hidden_dim=64", "method.proj_output_dim=16", "method.queue_size=128")
V3 = ("method=moco_v3", "data=synthetic", "backbone=resnet18_tiny", "data.batch_size=32",
      "method.proj_hidden_dim=64", "method.proj_output_dim=16", "method.pred_hidden_dim=64")


def reference_ctr(q, k, t):
    """MoCo v3's ctr(q, k) * 2T written out sample by sample (Chen et al. 2021, Alg. 1)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j]) / t for j in range(k.shape[0])]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return total / q.shape[0] * 2 * t


def test_moco_v3_loss_matches_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(6, 5, generator=g) for _ in range(4))
    for t in (0.2, 1.0):
        expected = reference_ctr(q1, k2, t) + reference_ctr(q2, k1, t)
        assert abs(float(moco_v3_loss(q1, q2, k1, k2, t)) - expected) < 1e-5


def test_moco_v3_ranks_average_to_the_full_batch_loss():
    """With keys gathered from 2 ranks, rank r's positives sit at offset r*B; the mean is the 1-rank loss."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    full = moco_v3_ctr(q, k, 0.2)
    per_rank = [moco_v3_ctr(q[r * 4:(r + 1) * 4], k, 0.2, rank=r) for r in range(2)]
    assert torch.allclose(torch.stack(per_rank).mean(), full, atol=1e-6)
    assert abs(float(full) - reference_ctr(q, k, 0.2)) < 1e-5


def test_moco_v2_loss_matches_hand_written_reference():
    g = torch.Generator().manual_seed(2)
    q, k, queue = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    qn, kn, un = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    expected = 0.0
    for i in range(5):
        pos = float(qn[i] @ kn[i]) / 0.2
        negs = [float(qn[i] @ un[j]) / 0.2 for j in range(7)]
        expected += -(pos - math.log(math.exp(pos) + sum(math.exp(x) for x in negs)))
    assert abs(float(moco_v2_loss(q, k, queue, 0.2)) - expected / 5) < 1e-5


def layer_types(seq):
    return [type(m) for m in seq]


def test_moco_v2_follows_the_paper(make_cfg):
    cfg = make_cfg("method=moco_v2", "data=synthetic", "backbone=resnet18_tiny")
    model = build_method(cfg, 4)
    assert isinstance(model, MoCoV2)
    assert layer_types(model.projector) == [nn.Linear, nn.ReLU, nn.Linear]
    assert (model.projector[0].out_features, model.projector[2].out_features) == (2048, 128)
    assert model.queue.shape == (2, 65536, 128) and int(model.queue_ptr) == 0
    assert torch.allclose(model.queue.norm(dim=-1), torch.ones(2, 65536))
    assert cfg.method.temperature == 0.2
    view = dict(cfg.augment.all_views)
    assert (view["brightness"], view["contrast"], view["saturation"], view["hue"]) == (0.4, 0.4, 0.4, 0.1)
    assert (view["jitter_prob"], view["grayscale_prob"], view["blur_prob"]) == (0.8, 0.2, 0.5)
    assert model.momentum_backbone is not model.backbone


def test_moco_v3_resnet_heads_and_temperature(make_cfg):
    model = build_method(make_cfg("method=moco_v3", "data=synthetic", "backbone=resnet18_tiny"), 4)
    assert isinstance(model, MoCoV3) and model.temperature == 1.0
    assert layer_types(model.projector) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert model.projector[1].num_features == 4096 and model.projector[3].out_features == 256
    assert not model.projector[-1].affine and model.projector[-1].weight is None
    assert layer_types(model.predictor) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no final BN
    assert model.predictor[0].in_features == 256 and model.predictor[-1].out_features == 256
    heads = [m for h in (model.projector, model.predictor) for m in h if isinstance(m, nn.Linear)]
    assert all(m.bias is None for m in heads)  # no Linear of the heads has a bias, as in the reference
    # predictor on the query side only: no momentum copy of it
    assert not any(n.startswith("momentum_predictor") for n, _ in model.named_modules())


VIT = ("method=moco_v3", "data=synthetic", "backbone=vit_tiny", "data.image_size=16",
       "method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "method.proj_output_dim=16")


def test_moco_v3_vit_heads_frozen_patch_projection_and_sincos(make_cfg):
    model = build_method(make_cfg(*VIT), 4)
    assert model.temperature == 0.2
    assert sum(isinstance(m, nn.Linear) for m in model.projector) == 3
    assert isinstance(model.predictor[-1], nn.BatchNorm1d) and not model.predictor[-1].affine
    vit = model.backbone
    assert not vit.patch_embed.proj.weight.requires_grad and not vit.patch_embed.proj.bias.requires_grad
    assert not vit.pos_embed.requires_grad
    assert torch.allclose(vit.pos_embed, sincos_2d(192, 4, 4, num_prefix=1))
    assert torch.equal(model.momentum_backbone.pos_embed, vit.pos_embed)
    assert torch.equal(model.momentum_backbone.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    frozen = {id(vit.pos_embed), id(vit.patch_embed.proj.weight)}
    assert not frozen & {id(p) for g in model.param_groups() for p in g["params"]}
    # options off: learned position embedding and patch projection; explicit temperature
    model = build_method(make_cfg(*VIT, "method.vit_frozen_patch_embed=false", "method.vit_sincos_pos_embed=false",
                                  "method.temperature=0.5"), 4)
    assert model.backbone.patch_embed.proj.weight.requires_grad and model.backbone.pos_embed.requires_grad
    assert model.temperature == 0.5


def test_moco_v3_vit_is_initialised_as_vits_py(make_cfg):
    """facebookresearch/moco-v3 vits.py: qkv uniform with the xavier bound of one Q/K/V part,
    sqrt(6 / (out/3 + in)); every other Linear xavier-uniform; zero biases; class token N(0, 1e-6);
    patch projection xavier-uniform over the flattened patch with zero bias. The momentum encoder
    starts as an exact copy."""
    torch.manual_seed(0)
    model = build_method(make_cfg("method=moco_v3", "data=synthetic", "backbone=vit_small", "data.image_size=32",
                                  "backbone.patch_size=4", "+backbone.kwargs.num_heads=12",
                                  "method.proj_hidden_dim=64", "method.pred_hidden_dim=64",
                                  "method.proj_output_dim=16"), 4)
    vit = model.backbone

    def check_uniform(w, bound, name):
        w = w.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound, name

    linears = [(n, m) for n, m in vit.named_modules() if isinstance(m, nn.Linear)]
    qkv = [(n, m) for n, m in linears if "qkv" in n]
    assert len(qkv) == 12
    for name, m in linears:
        out_f, in_f = m.weight.shape
        if "qkv" in name:  # 1152 x 384: bound sqrt(6 / (384 + 384)), not the whole matrix's sqrt(6 / (1152 + 384))
            bound = math.sqrt(6.0 / (out_f // 3 + in_f))
            for part in m.weight.chunk(3):
                check_uniform(part, bound, name)
        else:
            check_uniform(m.weight, math.sqrt(6.0 / (out_f + in_f)), name)
        assert torch.equal(m.bias.detach(), torch.zeros_like(m.bias)), name
    assert float(vit.cls_token.detach().std()) < 3e-6 and vit.cls_token.abs().max() > 0
    proj = vit.patch_embed.proj
    check_uniform(proj.weight, math.sqrt(6.0 / (3 * 4 * 4 + 384)), "patch_embed")
    assert torch.equal(proj.bias.detach(), torch.zeros(384))
    for a, b in zip(vit.state_dict().values(), model.momentum_backbone.state_dict().values()):
        assert torch.equal(a, b)
    # off: timm's own init (trunc-normal 0.02 Linears)
    torch.manual_seed(0)
    plain = build_method(make_cfg("method=moco_v3", "data=synthetic", "backbone=vit_small", "data.image_size=32",
                                  "backbone.patch_size=4", "method.vit_moco_init=false", "method.proj_hidden_dim=64",
                                  "method.pred_hidden_dim=64", "method.proj_output_dim=16"), 4)
    assert abs(float(plain.backbone.blocks[0].mlp.fc1.weight.detach().std()) - 0.02) < 0.002


def test_moco_v3_views_are_asymmetric(make_cfg):
    cfg = make_cfg("method=moco_v3", "data=synthetic", "backbone=resnet18_tiny", "data.image_size=96")
    model = build_method(cfg, 4)

    def op(view, kind):
        return model.augment.probabilities(view)[kind]

    assert model.augment.names == ["view1", "view2"]
    assert (op(0, "blur"), op(1, "blur")) == (1.0, 0.1)
    assert (op(0, "solarize"), op(1, "solarize")) == (0.0, 0.2)


def test_queue_enqueue_writes_at_pointer_and_wraps(make_cfg):
    model = build_method(make_cfg(*V2, "method.queue_size=8", "method.proj_output_dim=4"), 4)
    batches = [torch.randn(2, 4, 4) for _ in range(3)]
    model.enqueue(batches[0])
    assert int(model.queue_ptr) == 4
    assert torch.allclose(model.queue[:, :4], F.normalize(batches[0], dim=-1))
    model.enqueue(batches[1])
    assert int(model.queue_ptr) == 0  # wrapped
    assert torch.allclose(model.queue[:, 4:], F.normalize(batches[1], dim=-1))
    model.enqueue(batches[2])  # overwrites the oldest keys
    assert int(model.queue_ptr) == 4
    assert torch.allclose(model.queue[:, :4], F.normalize(batches[2], dim=-1))
    assert torch.allclose(model.queue[:, 4:], F.normalize(batches[1], dim=-1))


def test_training_step_enqueues_this_steps_keys_after_the_loss(make_cfg):
    torch.manual_seed(0)
    model = build_method(make_cfg(*V2), 4)
    views = model.augment(torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8))
    before = model.queue.clone()
    with torch.no_grad():
        k1, k2 = model.keys(views)
    out = model.forward_views(views)
    out["loss"].backward()  # enqueue after the loss must not break autograd
    assert int(model.queue_ptr) == 32
    assert torch.allclose(model.queue[0, :32], F.normalize(k1, dim=-1), atol=1e-5)
    assert torch.allclose(model.queue[1, :32], F.normalize(k2, dim=-1), atol=1e-5)
    assert torch.equal(model.queue[:, 32:], before[:, 32:])


def fit(model, cfg, steps=2):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=SSLDataModule(cfg.data))
    return trainer


def test_queue_size_not_a_multiple_of_the_global_batch_is_refused(make_cfg):
    cfg = make_cfg(*V2, "method.queue_size=100")
    with pytest.raises(ConfigError) as e:
        fit(build_method(cfg, 4), cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("method.queue_size: 100 is not a multiple of the global batch 32")
    assert "method.queue_size=96" in msg


def test_queue_larger_than_the_data_is_warned_about(make_cfg, caplog):
    cfg = make_cfg(*V2, "method.queue_size=512")  # synthetic: 384 training images
    with caplog.at_level("WARNING", logger="ssl_vision.methods.moco"):
        fit(build_method(cfg, 4), cfg, steps=1)
    assert "method.queue_size=512 exceeds the 384 training images" in caplog.text
    # about a fifth of the images, rounded down to a multiple of the global batch 32: 384 // 160 * 32
    assert "method.queue_size=64" in caplog.text


@pytest.mark.parametrize("overrides", [V2, V3])
def test_queue_and_ema_weights_survive_save_and_load(make_cfg, tmp_path, overrides):
    cfg = make_cfg(*overrides)
    torch.manual_seed(0)
    model = build_method(cfg, 4)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fit(model, cfg)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(1)
    fresh = build_method(cfg, 4)
    state = model.state_dict()
    ema = [k for k in state if k.startswith(("momentum_backbone.", "momentum_projector."))]
    assert ema and any(not torch.equal(state[k], init[k]) for k in ema)  # the EMA moved
    assert any(not torch.equal(fresh.state_dict()[k], state[k]) for k in ema)
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    loaded = fresh.state_dict()
    for k in ema:
        assert torch.equal(loaded[k], state[k]), k
    if isinstance(model, MoCoV2):
        assert int(model.queue_ptr) == 2 * 32 and not torch.equal(model.queue, init["queue"])
        assert torch.equal(fresh.queue, model.queue) and torch.equal(fresh.queue_ptr, model.queue_ptr)


# --- two gloo processes -------------------------------------------------------------------------------

WORKER = """
import sys, torch, torch.distributed as dist
from ssl_vision.distributed import gather_no_grad
from ssl_vision.losses import moco_v3_ctr
dist.init_process_group("gloo")
r, data = dist.get_rank(), torch.load(sys.argv[1])
q, k = data["q"], data["k"]
b = q.shape[0] // 2
q_local = q[r * b:(r + 1) * b].clone().requires_grad_(True)
k_all = gather_no_grad(k[r * b:(r + 1) * b])
loss = moco_v3_ctr(q_local, k_all, 0.2, rank=r)
loss.backward()
torch.save({"loss": loss.detach(), "grad": q_local.grad, "k_all": k_all}, sys.argv[2] + str(r))
dist.destroy_process_group()
"""


def test_moco_v3_two_ranks_match_one_rank_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    torch.save({"q": q, "k": k}, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "data.pt"),
                               str(tmp_path / "out")],
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    out = [torch.load(tmp_path / f"out{r}") for r in range(2)]
    qf = q.clone().requires_grad_(True)
    full = moco_v3_ctr(qf, k, 0.2)
    full.backward()
    assert torch.equal(out[0]["k_all"], k) and torch.equal(out[1]["k_all"], k)  # keys gathered in rank order
    assert abs(float(out[0]["loss"] + out[1]["loss"]) / 2 - float(full)) < 1e-6
    # DDP averages gradients over ranks: each rank's gradient / 2 is the 1-rank gradient of its rows
    assert torch.allclose(torch.cat([out[0]["grad"], out[1]["grad"]]) / 2, qf.grad, atol=1e-6)
