"""Mixed precision: every method trains under ``trainer.precision=bf16-mixed`` on the CPU, the
backbone really runs in bfloat16, and the losses and the MoCo v2 queue stay float32."""

import lightning as L
import pytest
import torch
from torch import nn

from ssl_vision.data import SSLDataModule
from ssl_vision.losses import mae_loss, moco_v2_loss, moco_v3_loss, nt_xent
from ssl_vision.methods import build_method

COMMON = ("data=synthetic", "data.num_samples=64", "data.batch_size=16", "data.image_size=16")
RESNET = ("backbone=resnet18_tiny", "method.proj_hidden_dim=32", "method.proj_output_dim=16")
CASES = {
    "simclr": ("method=simclr", *RESNET),
    "moco_v2": ("method=moco_v2", *RESNET, "method.queue_size=48"),
    "moco_v3": ("method=moco_v3", *RESNET, "method.pred_hidden_dim=32"),
    "mae": ("method=mae", "backbone=vit_tiny", "backbone.patch_size=4", "+backbone.kwargs.depth=2",
            "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"),
}


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


@pytest.mark.parametrize("name", list(CASES))
def test_every_method_trains_under_bf16_mixed(make_cfg, name):
    cfg = make_cfg(*COMMON, *CASES[name])
    torch.manual_seed(0)
    dm = SSLDataModule(cfg.data)
    model = build_method(cfg, num_classes=4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    dtypes = set()
    for m in model.backbone.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, datamodule=dm)

    assert torch.bfloat16 in dtypes  # autocast ran the backbone's convolutions / linears in bf16
    assert len(recorder.losses) == 2
    for loss in recorder.losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    after = model.backbone.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # weights stay fp32
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    if name == "moco_v2":
        assert model.queue.dtype == torch.float32 and int(model.queue_ptr) == 2 * 16
        assert torch.allclose(model.queue.norm(dim=-1), torch.ones(()), atol=1e-5)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 16, generator=g)
    # near-duplicate embeddings: cosines close to 1, where 16-bit logits lose the differences
    return q, q + 0.05 * torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g)


LOSSES = {
    "nt_xent": lambda q, k, neg: nt_xent(q, k, 0.1),
    "moco_v2": lambda q, k, neg: moco_v2_loss(q, k, neg, 0.2),
    "moco_v3": lambda q, k, neg: moco_v3_loss(q, k, k, q, 0.2),
    "mae": lambda q, k, neg: mae_loss(q[:, None], k[:, None], torch.ones(8, 1), norm_pix=True),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_are_float32_under_autocast(name):
    inputs = _inputs()
    reference = LOSSES[name](*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LOSSES[name](*inputs)  # float32 inputs: the loss's own matmuls would be autocast to bf16
        from_bf16 = LOSSES[name](*(x.bfloat16() for x in inputs))  # what the heads hand over
    assert mixed.dtype == from_bf16.dtype == torch.float32
    assert torch.allclose(mixed, reference, rtol=1e-6, atol=1e-6)
    rounded = LOSSES[name](*(x.bfloat16().float() for x in inputs))  # the inputs' rounding is all that differs
    assert torch.allclose(from_bf16, rounded, rtol=1e-6, atol=1e-6)


def test_mae_target_is_float32_under_autocast_and_equals_the_patches():
    """The reconstruction target must not be rounded by autocast: patchify is views and a permute only (an op
    that autocast lowers - a matmul, a convolution - would hand the float32 loss a 16-bit target)."""
    from ssl_vision.methods.mae import patchify, unpatchify

    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # a 2 x 2 grid of 4 px patches
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = patchify(images, 4)
    assert target.dtype == torch.float32
    expected = torch.stack([torch.stack([images[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(1, 2, 0).reshape(-1)
                                         for i in range(2) for j in range(2)]) for b in range(2)])
    assert torch.equal(target, expected)  # row-major patches, pixels as (p, p, C), bit for bit
    assert torch.equal(unpatchify(target, 4), images)


def test_simclr_gathers_float32_projections_under_autocast(make_cfg, monkeypatch):
    """The gather's backward sums every rank's gradient of these rows: it must do so in float32."""
    import ssl_vision.methods.simclr as simclr

    seen = []

    def gather(x):
        seen.append(x.dtype)
        return x

    monkeypatch.setattr(simclr, "gather_with_grad", gather)
    model = build_method(make_cfg(*COMMON, *CASES["simclr"]), num_classes=0)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_views(views)
        projected = model.projector(model.backbone(views[0]))
    assert projected.dtype == torch.bfloat16  # the heads do run in bf16
    assert seen == [torch.float32, torch.float32] and out["loss"].dtype == torch.float32
