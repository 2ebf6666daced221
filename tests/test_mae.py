"""MAE: masking, patch order, loss on masked patches only, encoder on visible tokens, config."""

import lightning as L
import pytest
import math

import torch
from torch import nn

from ssl_vision.config import ConfigError
from ssl_vision.data import SSLDataModule
from ssl_vision.losses import mae_loss
from ssl_vision.methods import build_method
from ssl_vision.methods.base import LocalBatchNorm1d
from ssl_vision.methods.mae import MAE, patchify, random_masking, unpatchify
from ssl_vision.pos_embed import sincos_1d, sincos_2d

TINY_MAE = ("method=mae", "data=synthetic", "backbone=vit_tiny", "data.image_size=16", "backbone.patch_size=4",
            "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2")


def test_random_masking_keeps_the_right_count_and_restores_order():
    torch.manual_seed(0)
    b, n, ratio = 6, 16, 0.75
    x = torch.arange(n).float()[None, :, None].expand(b, n, 2).clone() + torch.randn(b, 1, 2)
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(n * (1 - ratio))
    assert kept.shape == (b, keep, 2) and mask.shape == (b, n) and ids_restore.shape == (b, n)
    assert torch.equal(mask.sum(1), torch.full((b,), float(n - keep)))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    for i in range(b):
        positions = (kept[i, :, 0] - x[i, 0, 0]).round().long()  # token index of each kept token
        assert torch.allclose(kept[i], x[i, positions])
        assert torch.equal(mask[i, positions], torch.zeros(keep))  # kept <=> mask 0
    # round trip: kept tokens + placeholders, un-shuffled with ids_restore, put every kept token back in place
    filled = torch.cat([kept, torch.full((b, n - keep, 2), -1.0)], dim=1)
    restored = filled.gather(1, ids_restore[:, :, None].expand(-1, -1, 2))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert torch.all(restored[~visible] == -1.0)
    # per-sample masks differ
    assert len({tuple(m.tolist()) for m in mask}) == b


def test_masking_follows_the_given_noise():
    x = torch.randn(3, 64, 4)
    noise = torch.rand(3, 64)
    kept, mask, _ = random_masking(x, 0.5, noise=noise)
    assert kept.shape == (3, 32, 4)
    smallest = noise.argsort(dim=1)[:, :32]  # the 50% of tokens with the smallest noise are kept
    assert torch.equal(kept, x.gather(1, smallest[:, :, None].expand(-1, -1, 4)))
    assert torch.equal(mask, (noise > noise.sort(dim=1).values[:, 31:32]).float())


def test_patchify_is_row_major_like_patch_embed_and_inverts():
    p, g = 4, 3
    idx = torch.arange(g * g).float().reshape(1, 1, g, g)
    img = idx.repeat_interleave(p, 2).repeat_interleave(p, 3).expand(2, 3, -1, -1).clone()
    patches = patchify(img, p)
    assert patches.shape == (2, g * g, p * p * 3)
    assert torch.equal(patches[0, :, 0], torch.arange(g * g).float())
    assert torch.all(patches == patches[..., :1])  # one constant value per patch
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(unpatchify(patchify(x, p), p), x)
    # channel order inside a patch is (row, col, channel)
    x = torch.zeros(1, 3, 4, 4)
    x[0, 2, 0, 1] = 1.0
    assert patchify(x, 4)[0, 0].nonzero().flatten().tolist() == [(0 * 4 + 1) * 3 + 2]


def test_mae_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]]).float()
    expected = sum(((pred[i, j] - target[i, j]) ** 2).mean() for i in range(2) for j in range(6) if mask[i, j]) / 6
    assert torch.allclose(mae_loss(pred, target, mask), expected)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible patches do not count
    assert torch.allclose(mae_loss(changed, target, mask), expected)
    # norm_pix: each target patch is standardized by its own mean and (unbiased) variance
    t = target[0, 0]
    t_norm = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
    only_first = torch.zeros(2, 6)
    only_first[0, 0] = 1
    assert torch.allclose(mae_loss(pred, target, only_first, norm_pix=True), ((pred[0, 0] - t_norm) ** 2).mean())


def test_sincos_position_embedding_formula():
    table = sincos_2d(8, 2, 3, num_prefix=1)
    assert table.shape == (1, 1 + 6, 8) and torch.equal(table[0, 0], torch.zeros(8))
    row, col = 1, 2  # token 1 + row * 3 + col
    w = [1.0, 1.0 / 100.0]  # 1 / 10000 ** (i / 2)
    expected = [torch.sin(torch.tensor(col * w[0])), torch.sin(torch.tensor(col * w[1])),
                torch.cos(torch.tensor(col * w[0])), torch.cos(torch.tensor(col * w[1])),
                torch.sin(torch.tensor(row * w[0])), torch.sin(torch.tensor(row * w[1])),
                torch.cos(torch.tensor(row * w[0])), torch.cos(torch.tensor(row * w[1]))]
    assert torch.allclose(table[0, 1 + row * 3 + col], torch.stack(expected), atol=1e-6)
    assert sincos_1d(4, torch.arange(5)).shape == (5, 4)
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_2d(6, 2, 2)


def test_encoder_sees_only_the_visible_tokens(make_cfg):
    torch.manual_seed(0)
    model = build_method(make_cfg(*TINY_MAE), 4)
    seen = []
    model.backbone.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    images = torch.randn(3, 3, 16, 16)
    latent, mask, ids_restore = model.encode(images, 0.75)
    assert seen == [(3, 1 + 4, 192)]  # class token + 25% of the 16 patches
    assert latent.shape == (3, 5, 192) and mask.shape == (3, 16)
    seen.clear()
    model.encode(images, 0.5)
    assert seen == [(3, 1 + 8, 192)]
    seen.clear()
    out = model.forward_views([images])
    assert seen[0] == (3, 5, 192) and seen[-1] == (3, 17, 192)  # masked pass, then the probe's full pass
    assert out["pred"].shape == (3, 16, 4 * 4 * 3)
    # the probe reads the encoder's pooled feature of the unmasked image, detached
    assert not out["feats"].requires_grad
    with torch.no_grad():
        assert torch.allclose(out["feats"], model.backbone(images), atol=1e-5)
    # the loss depends on the prediction of masked patches only
    out["loss"].backward()
    assert model.decoder_pred.weight.grad is not None and model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_mae_gradient_reaches_only_masked_patch_predictions(make_cfg):
    torch.manual_seed(0)
    model = build_method(make_cfg(*TINY_MAE), 4)
    images = torch.randn(2, 3, 16, 16)
    latent, mask, ids_restore = model.encode(images, 0.75)
    pred = model.decode(latent, ids_restore)
    pred.retain_grad()
    mae_loss(pred, patchify(images, 4), mask, norm_pix=True).backward()
    per_patch = pred.grad.abs().sum(-1)
    assert torch.all(per_patch[mask == 0] == 0) and torch.all(per_patch[mask == 1] > 0)


def test_mae_follows_the_paper(make_cfg):
    cfg = make_cfg("method=mae", "data=synthetic", "backbone=vit_tiny")
    model = build_method(cfg, 4)
    assert isinstance(model, MAE)
    assert (cfg.method.mask_ratio, cfg.method.norm_pix_loss) == (0.75, True)
    assert model.decoder_embed.out_features == 512 and len(model.decoder_blocks) == 8
    assert model.decoder_blocks[0].attn.num_heads == 16
    assert not model.backbone.pos_embed.requires_grad
    assert torch.allclose(model.backbone.pos_embed, sincos_2d(192, 4, 4, 1))
    assert torch.allclose(model.decoder_pos_embed, sincos_2d(512, 4, 4, 1))
    o = cfg.optimizer
    assert (o.name, tuple(o.betas), o.weight_decay) == ("adamw", (0.9, 0.95), 0.05)
    v = cfg.augment.all_views
    assert tuple(v.crop_scale) == (0.2, 1.0) and v.flip_prob == 0.5
    assert v.jitter_prob == v.grayscale_prob == v.blur_prob == v.solarize_prob == 0.0
    assert list(cfg.augment.views) == ["view1"]
    assert model.augment.probabilities(0) == {"flip": 0.5, "jitter": 0.0, "grayscale": 0.0, "blur": 0.0,
                                              "solarize": 0.0}
    optimizer = model.param_groups()
    assert id(model.backbone.pos_embed) not in {id(p) for g in optimizer for p in g["params"]}


def test_mae_needs_a_vit(make_cfg):
    with pytest.raises(ConfigError) as e:
        build_method(make_cfg("method=mae", "data=synthetic", "backbone=resnet18_tiny"), 4)
    msg = str(e.value)
    assert "\n" not in msg and "method 'mae' needs a vit backbone" in msg and "resnet18_tiny" in msg


def test_mae_trains_in_lightning_and_the_online_probe_learns(make_cfg):
    cfg = make_cfg(*TINY_MAE, "data.batch_size=32")
    torch.manual_seed(0)
    model = build_method(cfg, 4)
    # the online probe standardizes the features first (BN without affine), as MAE's linear probe does
    # (a BatchNorm that SyncBatchNorm leaves per rank: tests/test_ddp.py)
    assert isinstance(model.probe[0], LocalBatchNorm1d) and not list(model.probe[0].parameters())
    probe = model.probe[-1].weight.detach().clone()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=SSLDataModule(cfg.data))
    assert trainer.global_step == 3
    assert not torch.equal(model.probe[-1].weight, probe)
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])


class _ProbeWatch(L.Callback):
    """Per training step: the probe's weight after the optimizer step, and how many full-token encoder passes ran."""

    def __init__(self, model):
        self.weights, self.full_passes, self._passes = [], [], 0
        model.backbone.blocks[0].register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self._passes += inputs[0].shape[1] == 17  # class token + all 16 patches: not the masked encoder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.probe[-1].weight.detach().clone())
        self.full_passes.append(self._passes)
        self._passes = 0


def test_probe_every_n_steps_trains_the_probe_and_runs_maes_full_forward_on_due_steps_only(make_cfg):
    """probe.every_n_steps=3: the probe's weights move at steps 0, 3, 6 only (no momentum drift on the
    others, where AdamW's moments would move them on a zero gradient) and MAE's no-grad full-image forward runs on those steps alone; a bad value is one line."""
    cfg = make_cfg(*TINY_MAE, "data.batch_size=16", "probe.every_n_steps=3",
                   "eval.online_knn.every_n_epochs=0")  # (its bank would need the features every step); AdamW: a zero gradient would still move
    torch.manual_seed(0)
    model = build_method(cfg, 4)
    start = model.probe[-1].weight.detach().clone()
    watch = _ProbeWatch(model)
    trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[watch])
    trainer.fit(model, datamodule=SSLDataModule(cfg.data))
    before = [start] + watch.weights[:-1]
    moved = [not torch.equal(w, b) for w, b in zip(watch.weights, before)]
    assert moved == [True, False, False, True, False, False, True]
    assert watch.full_passes == [1, 0, 0, 1, 0, 0, 1]
    with pytest.raises(ConfigError, match="probe.every_n_steps"):
        build_method(make_cfg(*TINY_MAE, "probe.every_n_steps=-2"), 4)


def xavier_bound(fan_out: int, fan_in: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_encoder_and_decoder_are_initialised_as_models_mae(make_cfg):
    """facebookresearch/mae models_mae.py initialize_weights: every Linear of encoder and decoder
    xavier-uniform (bound sqrt(6 / (fan_in + fan_out))) with zero bias, LayerNorms 1 / 0, the patch
    embedding xavier over its flattened weight (its bias: nn.Conv2d's default bound 1 / sqrt(fan_in)),
    class and mask tokens N(0, 0.02)."""
    torch.manual_seed(0)
    model = build_method(make_cfg("method=mae", "data=synthetic", "backbone=vit_small", "data.image_size=32",
                                  "backbone.patch_size=4", "method.decoder_dim=64", "method.decoder_depth=1",
                                  "method.decoder_heads=4"), 4)
    vit = model.backbone
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("probe")]
    assert any(n.startswith("backbone.blocks.0.attn.qkv") for n, _ in linears)
    for name, m in linears:
        out_f, in_f = m.weight.shape
        bound = xavier_bound(out_f, in_f)
        w = m.weight.detach()
        assert w.abs().max() <= bound, name
        # uniform(-b, b): the largest draw is near b and the std is b / sqrt(3)
        assert w.abs().max() > 0.95 * bound, name
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound, name
        assert torch.equal(m.bias.detach(), torch.zeros_like(m.bias)), name
    # (timm's own ViT init, trunc-normal std 0.02, fails this: qkv's xavier std is 0.036)
    norms = [m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) and
                         torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    proj = vit.patch_embed.proj
    fan_in = proj.weight[0].numel()  # 3 * 4 * 4
    bound = xavier_bound(proj.weight.shape[0], fan_in)
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.95 * bound
    assert 0 < proj.bias.abs().max() <= 1 / math.sqrt(fan_in)
    for token in (vit.cls_token, model.mask_token):
        assert abs(float(token.detach().std()) - 0.02) < 0.006
