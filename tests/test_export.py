"""Export: a checkpoint's backbone, reloaded with plain timm, gives the same features (< 1e-5)."""

import json
import runpy
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from ssl_vision.config import ConfigError
from ssl_vision.data import SSLDataModule
from ssl_vision.evaluation import backbone_from_checkpoint, load_checkpoint
from ssl_vision.export import export_backbone, load_exported
from ssl_vision.methods import build_method

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def make_checkpoint(make_cfg, path, *overrides):
    """One real optimizer step of SimCLR on synthetic data, saved as Lightning saves it."""
    cfg = make_cfg("data=synthetic", "data.num_samples=16", "data.batch_size=4", *overrides)
    dm = SSLDataModule(cfg.data)
    dm.setup()
    model = build_method(cfg, dm.num_classes)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(path)
    return model, cfg


def features(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_resnet_with_small_stem_round_trips_through_plain_timm(tmp_path, make_cfg):
    ckpt = tmp_path / "last.ckpt"
    trained, cfg = make_checkpoint(make_cfg, ckpt, "backbone=resnet18_tiny", "data.image_size=16")
    weights, sidecar = export_backbone(ckpt, tmp_path / "export" / "r18.safetensors")
    meta = json.loads(sidecar.read_text())
    assert sidecar == tmp_path / "export" / "r18.json"
    assert meta["model_name"] == "resnet18" and meta["small_stem"] is True and meta["feature_dim"] == 128
    assert meta["create_model_kwargs"] == {"num_classes": 0, "channels": [16, 32, 64, 128]}
    assert meta["image_size"] == 16 and meta["mean"] == list(cfg.data.mean) and meta["patch_size"] is None

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = features(backbone_from_checkpoint(load_checkpoint(ckpt))[0], x)
    assert (features(trained.backbone, x) - reference).abs().max() < 1e-5  # the checkpoint is the model

    # plain timm, exactly as the module docstring tells a user (no ssl-vision import needed)
    plain = timm.create_model(meta["model_name"], pretrained=False, **meta["create_model_kwargs"])
    plain.conv1 = nn.Conv2d(3, plain.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    plain.maxpool = nn.Identity()
    plain.load_state_dict(load_file(str(weights)))
    assert (features(plain, x) - reference).abs().max() < 1e-5
    assert (features(load_exported(weights), x) - reference).abs().max() < 1e-5
    assert (features(load_exported(sidecar), x) - reference).abs().max() < 1e-5
    assert not any(k.startswith(("fc.", "head")) for k in load_file(str(weights)))


def test_resnet_without_small_stem_loads_with_pretrained_cfg_overlay(tmp_path, make_cfg):
    ckpt = tmp_path / "last.ckpt"
    make_checkpoint(make_cfg, ckpt, "backbone=resnet18_tiny", "data.image_size=72")
    tool = runpy.run_path(str(TOOLS / "export_backbone.py"))
    assert tool["main"]([str(ckpt)]) == 0  # default output next to the checkpoint
    weights = tmp_path / "last_backbone.safetensors"
    meta = json.loads((tmp_path / "last_backbone.json").read_text())
    assert meta["small_stem"] is False
    plain = timm.create_model(meta["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                              **meta["create_model_kwargs"])
    x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(1))
    reference = features(backbone_from_checkpoint(load_checkpoint(ckpt))[0], x)
    assert (features(plain, x) - reference).abs().max() < 1e-5


def test_vit_round_trips_through_plain_timm_pretrained_cfg_overlay(tmp_path, make_cfg):
    ckpt = tmp_path / "vit.ckpt"
    trained, _ = make_checkpoint(make_cfg, ckpt, "backbone=vit_tiny", "data.image_size=32")
    weights, sidecar = export_backbone(ckpt, tmp_path / "vit_tiny.safetensors")
    meta = json.loads(sidecar.read_text())
    assert meta["model_name"] == "vit_tiny_patch16_224" and meta["img_size"] == 32 and meta["patch_size"] == 4
    assert meta["create_model_kwargs"] == {"num_classes": 0, "img_size": 32, "patch_size": 4}
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                              num_classes=0, img_size=32, patch_size=4)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = features(trained.backbone, x)  # the features inside ssl-vision
    assert reference.shape == (3, 192)
    assert (features(plain, x) - reference).abs().max() < 1e-5
    # the export holds the trained weights (and export_backbone itself checked load_exported)
    exported = load_file(str(weights))
    assert exported.keys() == trained.backbone.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in trained.backbone.state_dict().items())


def test_missing_files_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint: .* does not exist"):
        export_backbone(tmp_path / "nope.ckpt")
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"sidecar file '.*x.json' does not exist"):
        load_exported(tmp_path / "x.safetensors")
