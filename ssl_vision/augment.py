"""Multi-view Kornia augmentation, built from config and run on the device on the whole batch.

The DataLoader only delivers fixed-size uint8 canvases; ``MultiViewAugment`` turns such a batch
into the list of augmented, normalized float views (one Kornia pipeline per view, so views can have
their own parameters, as MoCo v3 and BYOL need). ``EvalTransform`` is the deterministic
counterpart used for validation and feature extraction, ``ProbeCrops`` the per-sample fixed
random crops the offline linear probe trains on.

View settings (every key can be given per view under ``augment.views.<name>``):

- ``crop_scale`` [min, max] area fraction of RandomResizedCrop, ``crop_ratio`` aspect range
- ``flip_prob``
- ``jitter_prob``, ``brightness``, ``contrast``, ``saturation``, ``hue``
- ``grayscale_prob``
- ``blur_prob``, ``blur_sigma`` [min, max]; blur is only applied when the crop is at least
  ``blur_min_size`` pixels (the CIFAR-style references drop blur on small images)
- ``solarize_prob``
"""

from __future__ import annotations

from collections.abc import Mapping

import math

import kornia.augmentation as K
import torch
from kornia.geometry.transform import crop_and_resize
from torch import nn

DEFAULT_VIEW = {
    "crop_scale": [0.08, 1.0],
    "crop_ratio": [3 / 4, 4 / 3],
    "flip_prob": 0.5,
    "jitter_prob": 0.8,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "grayscale_prob": 0.2,
    "blur_prob": 0.0,
    "blur_sigma": [0.1, 2.0],
    "blur_min_size": 96,
    "solarize_prob": 0.0,
}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is passed through."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def view_pipeline(size: int, view: Mapping, mean, std) -> nn.Sequential:
    """One view's Kornia pipeline: crop, flip, jitter, grayscale, blur, solarize, normalize."""
    unknown = set(view) - set(DEFAULT_VIEW)
    if unknown:
        from .config import ConfigError

        raise ConfigError(
            f"augment.views: unknown setting(s) {sorted(unknown)}; valid: {', '.join(DEFAULT_VIEW)}"
        )
    v = {**DEFAULT_VIEW, **view}
    ops: list[nn.Module] = [
        K.RandomResizedCrop((size, size), scale=tuple(v["crop_scale"]), ratio=tuple(v["crop_ratio"])),
    ]
    if v["flip_prob"] > 0:
        ops.append(K.RandomHorizontalFlip(p=v["flip_prob"]))
    if v["jitter_prob"] > 0:
        ops.append(
            K.ColorJitter(v["brightness"], v["contrast"], v["saturation"], v["hue"], p=v["jitter_prob"])
        )
    if v["grayscale_prob"] > 0:
        ops.append(K.RandomGrayscale(p=v["grayscale_prob"]))
    if v["blur_prob"] > 0 and size >= v["blur_min_size"]:
        kernel = int(0.1 * size) // 2 * 2 + 1  # 10% of the image, odd, as in SimCLR
        ops.append(K.RandomGaussianBlur((kernel, kernel), tuple(v["blur_sigma"]), p=v["blur_prob"]))
    if v["solarize_prob"] > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=v["solarize_prob"]))
    ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return nn.Sequential(*ops)


class MultiViewAugment(nn.Module):
    """uint8 batch (B, 3, H, W) -> list of normalized float views (B, 3, size, size)."""

    def __init__(self, size: int, views: Mapping[str, Mapping], mean, std):
        super().__init__()
        if not views:
            from .config import ConfigError

            raise ConfigError("augment.views: at least one view is needed")
        self.size = size
        self.names = list(views)
        self.pipelines = nn.ModuleList(view_pipeline(size, dict(views[n] or {}), mean, std) for n in self.names)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = to_float(images)
        return [p(x) for p in self.pipelines]


class EvalTransform(nn.Module):
    """Deterministic view: center crop of the canvas (resized to ``size`` if needed), normalized."""

    def __init__(self, size: int, mean, std):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, indexes: torch.Tensor | None = None) -> torch.Tensor:
        """``indexes`` is accepted for ``ProbeCrops``' signature and not used: every sample gets the same crop."""
        x = to_float(images)
        h, w = x.shape[-2:]
        if min(h, w) > self.size:
            top, left = (h - self.size) // 2, (w - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        elif (h, w) != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class ProbeCrops(nn.Module):
    """Random resized crop + flip for training the offline linear probe, fixed per sample.

    The standard linear protocol (MoCo, SimCLR, solo-learn) trains the head on random crops and
    flips and tests on center crops. Here the features of ``copies`` augmented versions of each
    image are extracted once; copy ``c`` of sample ``i`` always gets the same crop, drawn from a
    table seeded by ``(seed, c)`` and looked up by dataset index, so the features do not depend on
    batch order or on how the data are sharded over ranks.
    """

    def __init__(self, normalize: "EvalTransform", num_samples: int, copy: int, seed: int = 0,
                 crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5):
        super().__init__()
        self.normalize, self.size, self.flip_prob = normalize, normalize.size, float(flip_prob)
        self.crop_scale, self.log_ratio = tuple(crop_scale), (math.log(crop_ratio[0]), math.log(crop_ratio[1]))
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(copy))
        self.register_buffer("uniform", torch.rand(num_samples, 5, generator=g), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
        x = to_float(images)
        h, w = x.shape[-2:]
        u = self.uniform[indexes.cpu()].to(x.device)
        lo, hi = self.crop_scale
        area = (lo + (hi - lo) * u[:, 0]) * h * w
        ratio = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[:, 1])
        cw = (area * ratio).sqrt().clamp(1, w)
        ch = (area / ratio).sqrt().clamp(1, h)
        x0, y0 = u[:, 2] * (w - cw), u[:, 3] * (h - ch)
        x1, y1 = x0 + cw - 1, y0 + ch - 1
        boxes = torch.stack([torch.stack(c, dim=1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], dim=1)
        x = crop_and_resize(x, boxes, (self.size, self.size))
        flip = u[:, 4] < self.flip_prob
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.normalize(x)


def build_augment(acfg, size: int, mean, std) -> MultiViewAugment:
    """From the ``augment`` config: ``views`` maps view name -> settings (missing keys: defaults)."""
    from omegaconf import OmegaConf

    views = OmegaConf.to_container(acfg.views, resolve=True) if not isinstance(acfg.views, dict) else acfg.views
    base = OmegaConf.to_container(acfg.get("all_views") or {}, resolve=True) if acfg.get("all_views") else {}
    merged = {name: {**base, **(v or {})} for name, v in views.items()}
    return MultiViewAugment(size, merged, mean, std)
