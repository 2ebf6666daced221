"""timm backbone factory: name -> (module, feature dim).

Any timm model name works (``timm.create_model(name, num_classes=0)``); the presets below are the
short names the configs use. ResNets get the CIFAR-style stem (3x3 stride-1 conv, no max-pool) on
small images, as the CIFAR references do (``small_stem_style`` picks whose); ViTs take ``img_size``
and ``patch_size`` from config. Architecture changes a recipe's reference makes (e.g. 12 heads in
MoCo v3's and MAE's ViT-Small, torchvision's ResNet without zero-initialised last BN) are timm
keyword arguments in that recipe's ``backbone.kwargs``, not changes of the presets.
``channels_last`` stores the convolution weights NHWC (``backbone.channels_last``); the state dict
keeps the same keys and values, only the strides differ.
"""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from .config import ConfigError

PRESETS = {
    "resnet18": "resnet18",
    "resnet18_tiny": "resnet18",  # quarter width: the CPU demo backbone (see PRESET_KWARGS)
    "resnet50": "resnet50",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}

PRESET_KWARGS = {
    "resnet18_tiny": {"channels": (16, 32, 64, 128)},  # ~16x fewer FLOPs than resnet18
}

SMALL_IMAGE_MAX = 64  # images of at most this size get the small ResNet stem / small ViT patches
SMALL_STEM_STYLES = ("default", "solo_learn")


def timm_name(name: str) -> str:
    """Resolve a preset to its timm model name; fail with close matches for an unknown name."""
    resolved = PRESETS.get(name, name)
    if resolved not in timm.list_models():
        known = list(PRESETS) + timm.list_models()
        close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=4, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"backbone.name: unknown timm model '{name}'{hint} (presets: {', '.join(PRESETS)})"
        )
    return resolved


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def resolve_patch_size(patch_size, image_size: int) -> int:
    if patch_size in (None, "auto"):
        return 4 if image_size <= SMALL_IMAGE_MAX else (8 if image_size <= 96 else 16)
    return int(patch_size)


def _small_resnet_stem(model: nn.Module, style: str = "default") -> None:
    """Replace the 7x7 stride-2 stem and max-pool by a 3x3 stride-1 conv without max-pool.

    ``default``: padding 1 (same-size output, as google-research/simclr's CIFAR stem), weights
    kaiming-normal (fan_out) like every other conv of the ResNet. ``solo_learn``: padding 2 and
    nn.Conv2d's default init, as solo-learn's BaseMethod builds it (solo/methods/base.py: a 32 px
    image gives a 34 px first feature map).
    """
    conv = model.conv1
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError("backbone.small_stem: only ResNets with a single-conv stem can take the small-image stem")
    padding = 2 if style == "solo_learn" else 1
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=padding, bias=False)
    if style == "default":
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def build_backbone(
    name: str,
    image_size: int,
    small_stem="auto",
    patch_size="auto",
    kwargs: dict | None = None,
    channels_last: bool = False,
    small_stem_style: str = "default",
) -> tuple[nn.Module, int]:
    """Create a timm backbone without classifier (``kwargs`` may ask for one: ``num_classes``, as a fine-tuned
    model's config does); returns ``(module, feature_dim)``."""
    model_name = timm_name(name)
    if small_stem_style not in SMALL_STEM_STYLES:
        raise ConfigError(f"backbone.small_stem_style: unknown style '{small_stem_style}'; choose one of: "
                          f"{', '.join(SMALL_STEM_STYLES)}")
    kwargs = {**PRESET_KWARGS.get(name, {}), **(kwargs or {})}
    is_vit_name = model_name.startswith(("vit", "deit"))
    if is_vit_name:
        patch = resolve_patch_size(patch_size, image_size)
        if image_size % patch:
            patches = [p for p in range(2, 33) if image_size % p == 0 and image_size // p >= 2][-3:]
            raise ConfigError(
                f"backbone.patch_size: image size {image_size} is not divisible by the ViT patch {patch}; "
                + (f"use backbone.patch_size={' or '.join(str(p) for p in patches)}" if patches else
                   "use a patch that divides it")
                + f", or data.image_size={(image_size // patch or 1) * patch} for patch {patch}"
            )
        kwargs.update(img_size=image_size, patch_size=patch)
    num_classes = int(kwargs.pop("num_classes", 0))
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    if not is_vit(model):
        use_small = image_size <= SMALL_IMAGE_MAX if small_stem == "auto" else bool(small_stem)
        if use_small and hasattr(model, "conv1") and hasattr(model, "maxpool"):
            _small_resnet_stem(model, small_stem_style)
    dim = getattr(model, "num_features", None)
    if not dim:
        with torch.no_grad():
            dim = model.eval()(torch.zeros(1, 3, image_size, image_size)).shape[-1]
        model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, int(dim)


def backbone_from_config(bcfg, image_size: int) -> tuple[nn.Module, int]:
    return build_backbone(
        bcfg.name,
        image_size,
        small_stem=bcfg.get("small_stem", "auto"),
        patch_size=bcfg.get("patch_size", "auto"),
        small_stem_style=str(bcfg.get("small_stem_style", "default")),
        kwargs=dict(bcfg.get("kwargs") or {}),
        channels_last=bool(bcfg.get("channels_last", False)),
    )
