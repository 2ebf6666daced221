import pytest
import torch
from torch import nn

from ssl_vision.backbones import build_backbone, resolve_patch_size
from ssl_vision.config import ConfigError


def test_resnet_gets_small_image_stem_on_small_images():
    small, dim = build_backbone("resnet18", 32)
    assert dim == 512
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    big, _ = build_backbone("resnet18", 224)
    assert big.conv1.kernel_size == (7, 7) and not isinstance(big.maxpool, nn.Identity)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_feature_dims_of_presets_are_known_without_forward():
    assert build_backbone("resnet18_tiny", 16)[1] == 128
    assert build_backbone("vit_tiny", 32)[1] == 192


def test_vit_takes_image_and_patch_size():
    vit, dim = build_backbone("vit_tiny", 32, patch_size=8)
    assert vit.patch_embed.patch_size == (8, 8) and vit.patch_embed.num_patches == 16
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, dim)
    assert resolve_patch_size("auto", 32) == 4 and resolve_patch_size("auto", 224) == 16


def test_patch_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ConfigError, match="not divisible by the ViT patch 16"):
        build_backbone("vit_tiny", 40, patch_size=16)


def test_unknown_timm_model_suggests_close_matches():
    with pytest.raises(ConfigError) as e:
        build_backbone("resnet19", 32)
    assert "unknown timm model 'resnet19'" in str(e.value) and "resnet18" in str(e.value)


def test_channels_last_backbone_gives_the_same_features():
    torch.manual_seed(0)
    ref, _ = build_backbone("resnet18_tiny", 16)
    torch.manual_seed(0)
    nhwc, _ = build_backbone("resnet18_tiny", 16, channels_last=True)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not ref.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), nhwc.state_dict().values()))
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(ref(x), nhwc(x.contiguous(memory_format=torch.channels_last)), atol=1e-5)


def test_channels_last_method_keeps_nhwc_weights_and_views_through_loading_and_training(make_cfg):
    import lightning as L

    from ssl_vision.data import SSLDataModule
    from ssl_vision.methods import build_method

    args = ("method=moco_v2", "data=synthetic", "data.num_samples=64", "data.batch_size=16", "data.image_size=16",
            "backbone=resnet18_tiny", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
            "method.queue_size=48")
    plain = build_method(make_cfg(*args), 4)
    model = build_method(make_cfg(*args, "backbone.channels_last=true"), 4)
    model.load_state_dict(plain.state_dict())  # e.g. a checkpoint written without channels_last
    for backbone in (model.backbone, model.momentum_backbone):
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in backbone.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(plain.backbone(x), model.backbone(x.contiguous(memory_format=torch.channels_last)),
                          atol=1e-5)
    views = []
    model.backbone.register_forward_pre_hook(lambda mod, args: views.append(args[0]))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=SSLDataModule(model.cfg.data))
    assert len(views) == 2 and all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_backbone_trains_and_checkpoints_with_plain_keys(make_cfg, tmp_path):
    """backbone.compile=true: torch.compile really runs (inductor, gcc on the CPU), and the checkpoint
    loads into a compile=false model, the offline probe's backbone loader and the exporter."""
    import lightning as L

    from ssl_vision.data import SSLDataModule
    from ssl_vision.evaluation import backbone_from_checkpoint, load_checkpoint
    from ssl_vision.export import export_backbone
    from ssl_vision.methods import build_method

    args = ("method=simclr", "data=synthetic", "data.num_samples=32", "data.batch_size=8", "data.image_size=16",
            "backbone=resnet18_tiny", "+backbone.kwargs.layers=[1,1,1,1]", "method.proj_hidden_dim=32",
            "method.proj_output_dim=16")
    torch.manual_seed(0)
    model = build_method(make_cfg(*args, "backbone.compile=true"), 4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    traced = []  # a forward hook runs inside the compiled call: it is traced by dynamo, not run eagerly
    model.backbone.register_forward_hook(lambda mod, args, out: traced.append(torch.compiler.is_compiling()))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=SSLDataModule(model.cfg.data))
    assert traced and all(traced)
    assert trainer.global_step == 1
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)

    plain = build_method(make_cfg(*args), 4)
    state = load_checkpoint(path)["state_dict"]
    assert list(state) == list(plain.state_dict()) and not any("_orig_mod" in k for k in state)
    plain.load_state_dict(state)  # strict
    backbone, _ = backbone_from_checkpoint(load_checkpoint(path))
    assert all(torch.equal(v, state["backbone." + k]) for k, v in backbone.state_dict().items())
    export_backbone(path, tmp_path / "export.safetensors")  # rebuilds with plain timm and compares features
