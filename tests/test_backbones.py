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
