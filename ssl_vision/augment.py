"""Multi-view augmentation on the device, on the whole batch, with per-sample keyed random draws.

The DataLoader delivers uint8 canvases and each image's size on its canvas (``ssl_vision.data``).
``MultiViewAugment`` turns such a batch into the list of augmented, normalized float views, as the
references' torchvision pipelines do image by image:

1. **Crop geometry over each image's own extent**: each view's box is drawn with torchvision's
   ``RandomResizedCrop.get_params`` algorithm (area in ``crop_scale`` of the *original* image,
   log-uniform ratio, 10 tries, centre-crop fallback) in original pixels, mapped onto the canvas, and
   resized to the view's own ``size`` with the antialiased bilinear / bicubic filter of
   torchvision's ``resize(antialias=True)`` (PIL's), reading only the pixels inside the box. The
   horizontal flip is the same resize read right to left.
2. **Photometric ops** with torchvision's formulas, in its order: colour jitter (brightness,
   contrast, saturation, hue in a random order per image), grayscale, Gaussian blur, solarize, then
   normalization. Hue goes through Kornia's HSV conversion and blur through Kornia's Gaussian filter.

Every draw is keyed by (seed, epoch, sample index, view) (``ssl_vision.rng``): ``plan`` computes
all of a batch's parameters on the CPU from its sizes and indexes (a few hundred numbers per image,
before the batch moves), ``apply`` runs them on the device without a host sync (an op with
probability p < 1 runs on the images that drew it, by index lists known on the host).

View settings (any key per view under ``augment.views.<name>``, or for all under ``augment.all_views``):

- ``size``: output side in pixels (default ``data.image_size``: a global view; smaller: a local view)
- ``crop_scale`` [min, max] area fraction, ``crop_ratio`` aspect range, ``interpolation``
  (``bilinear`` | ``bicubic``)
- ``flip_prob``
- ``jitter_prob``, ``brightness``, ``contrast``, ``saturation``, ``hue``
- ``grayscale_prob``
- ``blur_prob``, ``blur_sigma`` [min, max], ``blur_kernel`` (``auto``: the odd kernel that covers
  +-3 sigma_max, 13 for sigma <= 2 - the full Gaussian of PIL's ``GaussianBlur(radius=sigma)`` that
  MoCo, solo-learn and DINO use, and which SimCLR / BYOL's 10%-of-224 kernel (23) contains at these
  sigmas; or an odd int); blur is only applied to views of at least ``blur_min_size`` pixels
- ``solarize_prob`` (pixels >= 0.5 inverted, PIL's ``solarize(threshold=128)``)
- ``randaugment`` (a timm RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``; after the crop, before
  normalization) and ``erase_prob`` (timm's random erasing, after normalization): the fine-tuning
  augmentation of MAE / DeiT, ``ssl_vision.randaugment``

Differences from the references, all below what an experiment can measure: the ops run in float on
the canvas, not on 8-bit PIL images re-quantized after each op; the canvas holds each image at
``min(1, data.canvas_size / long side)`` of its resolution (``ssl_vision.data.decoding``).

``EvalTransform`` is the deterministic counterpart (a centre crop of ``crop_fraction`` of the short
side, resized: 0.875 is the references' resize-to-256-then-crop-224; 1.0 the whole square image of
CIFAR / STL-10 / digits), ``ProbeCrops`` the per-sample fixed random crops the offline linear probe
trains on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import kornia
import torch
from torch import nn

from .randaugment import ERASE_DRAWS, RandAugment, erase, erase_boxes, parse_config
from .rng import keyed_uniform

DEFAULT_VIEW = {
    "size": None,
    "crop_scale": [0.08, 1.0],
    "crop_ratio": [3 / 4, 4 / 3],
    "interpolation": "bilinear",
    "flip_prob": 0.5,
    "jitter_prob": 0.8,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "grayscale_prob": 0.2,
    "blur_prob": 0.0,
    "blur_sigma": [0.1, 2.0],
    "blur_kernel": "auto",
    "blur_min_size": 96,
    "solarize_prob": 0.0,
    "randaugment": None,
    "erase_prob": 0.0,
}
INTERPOLATIONS = ("bilinear", "bicubic")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_TRIES = 10

# positions of each draw in a view's stream of uniforms (per sample)
_U_CROP, _U_FLIP, _U_JITTER, _U_FACTORS, _U_ORDER = 0, 4 * CROP_TRIES, 4 * CROP_TRIES + 1, 4 * CROP_TRIES + 2, 4 * CROP_TRIES + 6
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = _U_ORDER + 4, _U_ORDER + 5, _U_ORDER + 6, _U_ORDER + 7
_U_COUNT = _U_SOLARIZE + 1


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is passed through."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _config_error(message: str):
    from .config import ConfigError

    return ConfigError(message)


# --- geometry ---------------------------------------------------------------------------------------


def random_resized_crop_boxes(u: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                              scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch, from given uniforms.

    u: (B, 4 * 10) uniforms in [0, 1) (area, log-ratio, top, left for each of the 10 tries);
    height, width: (B,) the original images' sizes. Returns (B, 4) float64 boxes ``(x0, y0, x1, y1)``
    in original pixels: integer edges, exactly as torchvision computes ``(i, j, h, w)`` from the same
    draws (first try whose box fits, else the centre crop clamped to the ratio range).
    """
    u = u.double().view(-1, CROP_TRIES, 4)
    h_img, w_img = height.double()[:, None], width.double()[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    top = torch.floor(u[..., 2] * (h_img - h + 1))  # torch.randint(0, H - h + 1)
    left = torch.floor(u[..., 3] * (w_img - w + 1))
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none)
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
    # fallback: the whole image, clamped to the ratio range, centred
    h0, w0 = height.double(), width.double()
    in_ratio = w0 / h0
    fw = torch.where(in_ratio > max(ratio), torch.round(h0 * max(ratio)), w0)
    fh = torch.where(in_ratio < min(ratio), torch.round(w0 / min(ratio)), h0)
    ftop, fleft = torch.div(h0 - fh, 2, rounding_mode="floor"), torch.div(w0 - fw, 2, rounding_mode="floor")
    found = fits.any(dim=1)
    y0 = torch.where(found, pick(top), ftop)
    x0 = torch.where(found, pick(left), fleft)
    bh = torch.where(found, pick(h), fh)
    bw = torch.where(found, pick(w), fw)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)


def center_boxes(sizes: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, 4) canvas boxes: a centred square of ``fraction`` x the short side of each image's extent."""
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    side = fraction * torch.minimum(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def whole_canvas(images: torch.Tensor) -> torch.Tensor:
    """(B, 4) sizes of images that fill their canvas (in-memory data sets)."""
    h, w = images.shape[-2:]
    return torch.tensor([[h, w, h, w]], dtype=torch.long).expand(len(images), 4)


def to_canvas(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Boxes in original pixels -> canvas pixels (the image was scaled by canvas/orig per axis)."""
    sy = sizes[:, 0].double() / sizes[:, 2].double()
    sx = sizes[:, 1].double() / sizes[:, 3].double()
    return boxes.double() * torch.stack([sx, sy, sx, sy], dim=1)


def _filter(t: torch.Tensor, kind: str) -> torch.Tensor:
    t = t.abs()
    if kind == "bilinear":  # triangle
        return (1 - t).clamp_min(0)
    a = -0.5  # PIL's (and torch's antialiased) bicubic
    return torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                       torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, torch.zeros_like(t)))


def resize_weights(start: torch.Tensor, stop: torch.Tensor, limit: torch.Tensor, n_in: int, n_out: int,
                   kind: str = "bilinear") -> torch.Tensor:
    """(B, n_out, n_in) weights resizing each sample's interval [start, stop) of an axis to n_out pixels.

    PIL's resampling (which torchvision's ``resize(antialias=True)`` reproduces): output pixel o is
    centred at ``start + (o + 0.5) * s`` with ``s = (stop - start) / n_out``; its filter is widened by
    ``max(s, 1)`` (antialiasing when shrinking) and reads only the pixels of the interval (and below
    ``limit``, the image's extent on the canvas), with weights normalized to sum to 1.
    """
    start, stop = start.float(), stop.float()
    scale = (stop - start) / n_out
    support = scale.clamp_min(1.0)
    centers = start[:, None] + (torch.arange(n_out, device=start.device) + 0.5) * scale[:, None]  # (B, out)
    pix = torch.arange(n_in, device=start.device, dtype=torch.float32) + 0.5
    w = _filter((pix[None, None, :] - centers[:, :, None]) / support[:, None, None], kind)
    lo = torch.floor(start + 1e-4)[:, None, None]
    hi = torch.minimum(torch.ceil(stop - 1e-4), limit.float())[:, None, None]
    w = w * ((pix[None, None, :] >= lo) & (pix[None, None, :] < hi))
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total.abs() > 1e-8, total, torch.ones_like(total))


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor, size: int,
                 flip: torch.Tensor | None = None, kind: str = "bilinear") -> torch.Tensor:
    """Crop each sample's canvas box ``(x0, y0, x1, y1)`` and resize it to ``size``: (B, C, size, size).

    x: (B, C, H, W) float; boxes: (B, 4) canvas pixels; sizes: (B, >=2) extents ``(h, w)`` on the canvas;
    flip: (B,) bool, mirror the crop left-right. Two batched matmuls with ``resize_weights``.
    """
    boxes = boxes.to(x.device)
    sizes = sizes.to(x.device)
    wy = resize_weights(boxes[:, 1], boxes[:, 3], sizes[:, 0], x.shape[-2], size, kind)
    wx = resize_weights(boxes[:, 0], boxes[:, 2], sizes[:, 1], x.shape[-1], size, kind)
    if flip is not None:
        wx = torch.where(flip.to(x.device)[:, None, None], wx.flip(1), wx)
    out = torch.matmul(torch.matmul(wy[:, None], x), wx.transpose(1, 2)[:, None])
    return out.clamp_(0, 1) if kind == "bicubic" else out


# --- photometric ops (torchvision's formulas) ---------------------------------------------------------


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x, f):
    return (x * _per_sample(f)).clamp(0, 1)


def adjust_contrast(x, f):
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (_per_sample(f) * x + (1 - _per_sample(f)) * mean).clamp(0, 1)


def adjust_saturation(x, f):
    return (_per_sample(f) * x + (1 - _per_sample(f)) * grayscale(x)).clamp(0, 1)


def adjust_hue(x, f):
    """Rotate the hue by ``f`` turns (torchvision's ``adjust_hue``), through Kornia's HSV conversion."""
    hsv = kornia.color.rgb_to_hsv(x)
    h = torch.remainder(hsv[:, :1] + _per_sample(f) * (2 * math.pi), 2 * math.pi)
    return kornia.color.hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1)).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def blur_kernel_size(view: Mapping) -> int:
    k = view["blur_kernel"]
    if k in (None, "auto"):
        return 2 * math.ceil(3 * float(view["blur_sigma"][1])) + 1
    return int(k)


# --- the views ------------------------------------------------------------------------------------------


def _check_view(name: str, v: Mapping, image_size: int) -> dict:
    unknown = set(v) - set(DEFAULT_VIEW)
    if unknown:
        raise _config_error(f"augment.views.{name}: unknown setting(s) {sorted(unknown)}; valid: {', '.join(DEFAULT_VIEW)}")
    v = {**DEFAULT_VIEW, **v}
    v["size"] = int(image_size if v["size"] in (None, "auto") else v["size"])
    if not 0 < v["size"] <= image_size:
        raise _config_error(f"augment.views.{name}.size: {v['size']} must be in 1..data.image_size ({image_size}); "
                            "views at data.image_size are global, smaller ones local")
    if v["interpolation"] not in INTERPOLATIONS:
        raise _config_error(f"augment.views.{name}.interpolation: '{v['interpolation']}'; choose one of: "
                            f"{', '.join(INTERPOLATIONS)}")
    lo, hi = (float(s) for s in v["crop_scale"])
    if not 0 < lo <= hi <= 1:
        raise _config_error(f"augment.views.{name}.crop_scale: {[lo, hi]} must satisfy 0 < min <= max <= 1")
    r0, r1 = (float(r) for r in v["crop_ratio"])
    if not 0 < r0 <= r1:
        raise _config_error(f"augment.views.{name}.crop_ratio: {[r0, r1]} must satisfy 0 < min <= max")
    if v["randaugment"]:
        parse_config(v["randaugment"], f"augment.views.{name}.randaugment")
    for key in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "erase_prob"):
        if not 0 <= float(v[key]) <= 1:
            raise _config_error(f"augment.views.{name}.{key}: {v[key]} is not a probability in [0, 1]")
    k = v["blur_kernel"]
    if k not in (None, "auto") and (not str(k).isdigit() or int(k) % 2 == 0):
        raise _config_error(f"augment.views.{name}.blur_kernel: {k!r}; use auto or an odd number of pixels")
    return v


class MultiViewAugment(nn.Module):
    """uint8 batch -> list of normalized float views, global views (``size == image_size``) first.

    ``plan(sizes, indexes, epoch)`` draws every parameter of every view on the CPU; ``apply(images,
    plans)`` runs them on ``images``' device; ``forward`` does both.
    """

    def __init__(self, image_size: int, views: Mapping[str, Mapping], mean, std, seed: int = 0):
        super().__init__()
        if not views:
            raise _config_error("augment.views: at least one view is needed")
        self.image_size, self.seed = int(image_size), int(seed)
        checked = {name: _check_view(name, dict(v or {}), self.image_size) for name, v in views.items()}
        order = sorted(checked, key=lambda n: checked[n]["size"] != self.image_size)  # stable: globals first
        self.names = order
        self.views = [checked[n] for n in order]
        self.num_global = sum(v["size"] == self.image_size for v in self.views)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        fill = [min(255, round(255 * float(m))) for m in mean]  # timm's img_mean
        self.randaugments = [RandAugment(v["randaugment"], v["size"], fill, v["interpolation"]) if v["randaugment"]
                             else None for v in self.views]

    @property
    def sizes(self) -> list[int]:
        return [v["size"] for v in self.views]

    def probabilities(self, i: int) -> dict[str, float]:
        """The probability with which view ``i`` applies each random op (0: never), after its size rules."""
        v = self.views[i]
        jitter = any(float(v[k]) > 0 for k in ("brightness", "contrast", "saturation", "hue"))
        return {"flip": float(v["flip_prob"]), "jitter": float(v["jitter_prob"]) if jitter else 0.0,
                "grayscale": float(v["grayscale_prob"]),
                "blur": float(v["blur_prob"]) if v["size"] >= int(v["blur_min_size"]) else 0.0,
                "solarize": float(v["solarize_prob"])}

    def stream(self, name: str) -> str:
        return f"view:{name}"

    @torch.no_grad()
    def plan(self, sizes: torch.Tensor, indexes: torch.Tensor, epoch: int = 0) -> list[dict]:
        """Every random parameter of every view for one batch, on the CPU (``sizes`` (B, 4),
        ``indexes`` (B,)). Each plan holds tensors for the device and the crop boxes in original
        pixels (``boxes_orig``, for ``ssl-vision-views``)."""
        sizes, indexes = sizes.cpu(), indexes.cpu()
        plans = [self._plan_view(name, v, sizes, indexes, epoch) for name, v in zip(self.names, self.views)]
        for name, v, ra, p in zip(self.names, self.views, self.randaugments, plans):  # own streams: others unchanged
            self._plan_finetune_ops(name, v, ra, p, indexes, epoch)
        return plans

    def _plan_finetune_ops(self, name: str, v: dict, ra, p: dict, indexes, epoch: int) -> None:
        if ra is not None:
            p["randaugment"] = ra.plan(keyed_uniform(self.seed, epoch, indexes, f"{self.stream(name)}:randaugment",
                                                     ra.num_draws))
        if float(v["erase_prob"]) > 0:
            u = keyed_uniform(self.seed, epoch, indexes, f"{self.stream(name)}:erase", ERASE_DRAWS)
            boxes = erase_boxes(u, v["size"], v["size"], float(v["erase_prob"]))
            p["erase_index"] = torch.nonzero(boxes[:, 2] > 0)[:, 0]
            p["erase_boxes"] = boxes[p["erase_index"]]

    def _plan_view(self, name: str, v: dict, sizes, indexes, epoch: int) -> dict:
        u = keyed_uniform(self.seed, epoch, indexes, self.stream(name), _U_COUNT)
        orig = random_resized_crop_boxes(u[:, _U_CROP:_U_FLIP], sizes[:, 2], sizes[:, 3], v["crop_scale"],
                                         v["crop_ratio"])
        p = {"boxes": to_canvas(orig, sizes).float(), "boxes_orig": orig.long(),
             "flip": u[:, _U_FLIP] < float(v["flip_prob"])}
        ranges = [(max(0.0, 1 - float(v[k])), 1 + float(v[k])) for k in ("brightness", "contrast", "saturation")]
        ranges.append((-float(v["hue"]), float(v["hue"])))
        active = [float(v[k]) > 0 for k in ("brightness", "contrast", "saturation", "hue")]
        jitter = (u[:, _U_JITTER] < float(v["jitter_prob"])) & any(active)
        f = u[:, _U_FACTORS:_U_FACTORS + 4]
        p["jitter_factors"] = torch.stack([lo + (hi - lo) * f[:, i] for i, (lo, hi) in enumerate(ranges)], dim=1)
        order = u[:, _U_ORDER:_U_ORDER + 4].argsort(dim=1)  # a uniformly random permutation per image
        p["jitter_ops"] = torch.where(jitter[:, None], order, torch.full_like(order, 4))  # 4: no op at that step
        blur_on = v["size"] >= int(v["blur_min_size"]) and float(v["blur_prob"]) > 0
        blur = (u[:, _U_BLUR] < float(v["blur_prob"])) & blur_on
        s0, s1 = (float(s) for s in v["blur_sigma"])
        # which images each op touches, as index lists known here on the host: on the device every op runs
        # on just its images (no host sync, no work for the others); one tensor, sliced by name
        groups = {f"jitter{t}{k}": p["jitter_ops"][:, t] == k for t in range(4) for k in range(4) if active[k]}
        groups.update(gray=u[:, _U_GRAY] < float(v["grayscale_prob"]), blur=blur,
                      solarize=u[:, _U_SOLARIZE] < float(v["solarize_prob"]))
        parts, p["slices"], start = [], {}, 0
        for key, mask in groups.items():
            idx = torch.nonzero(mask)[:, 0]
            parts.append(idx)
            p["slices"][key] = (start, start + len(idx))
            start += len(idx)
        p["index"] = torch.cat(parts)
        p["blur_sigma"] = (s0 + (s1 - s0) * u[:, _U_SIGMA])[blur]
        return p

    @torch.no_grad()
    def apply(self, images: torch.Tensor, sizes: torch.Tensor, plans: list[dict]) -> list[torch.Tensor]:
        x = to_float(images)
        return [self._apply_view(x, sizes, v, p, ra) for v, p, ra in zip(self.views, plans, self.randaugments)]

    def _apply_view(self, x, sizes, v: dict, p: dict, ra=None) -> torch.Tensor:
        dev = x.device
        y = resized_crop(x, p["boxes"], sizes, v["size"], p["flip"], v["interpolation"])
        if "randaugment" in p:
            ra.apply(y, p["randaugment"])
        index = p["index"].to(dev)

        def subset(key: str, fn) -> None:  # y[idx] = fn(y[idx], idx), in place
            a, b = p["slices"].get(key, (0, 0))
            if b > a:
                idx = index[a:b]
                y.index_copy_(0, idx, fn(y.index_select(0, idx), idx))

        factors = p["jitter_factors"].to(dev)
        for t in range(4):  # each image's own random order of brightness, contrast, saturation, hue
            for k, op in enumerate(JITTER_OPS):
                subset(f"jitter{t}{k}", lambda z, idx, k=k, op=op: op(z, factors.index_select(0, idx)[:, k]))
        subset("gray", lambda z, idx: grayscale(z).expand_as(z))
        if "blur" in p["slices"]:
            k = blur_kernel_size(v)
            sigma = p["blur_sigma"].to(dev)
            subset("blur", lambda z, idx: kornia.filters.gaussian_blur2d(z, (k, k), torch.stack([sigma, sigma], 1),
                                                                          border_type="reflect"))
        subset("solarize", lambda z, idx: torch.where(z >= 0.5, 1 - z, z))
        y = y.sub_(self.mean).div_(self.std)
        if "erase_index" in p:
            erase(y, p["erase_boxes"], p["erase_index"])
        return y

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None, indexes: torch.Tensor | None = None,
                epoch: int = 0) -> list[torch.Tensor]:
        """Plan and apply. Without ``sizes`` every image fills its canvas; without ``indexes`` the samples
        are keyed 0..B-1."""
        if sizes is None:
            sizes = whole_canvas(images)
        if indexes is None:
            indexes = torch.arange(len(images))
        return self.apply(images, sizes, self.plan(sizes, indexes, epoch))


class EvalTransform(nn.Module):
    """Deterministic view: a centred square of ``crop_fraction`` x each image's short side, resized
    to ``size`` (antialiased ``interpolation``: bilinear, or bicubic as the fine-tuning references) and
    normalized. 0.875: the references' ImageNet evaluation (shorter side to size / 0.875, centre crop of
    size); 1.0: a whole square image (CIFAR, digits)."""

    def __init__(self, size: int, mean, std, crop_fraction: float = 1.0, interpolation: str = "bilinear"):
        super().__init__()
        self.size, self.crop_fraction, self.interpolation = int(size), float(crop_fraction), interpolation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sizes: torch.Tensor, indexes: torch.Tensor | None = None) -> torch.Tensor:
        """``indexes`` is accepted for ``ProbeCrops``' signature and not used: every sample gets the same crop."""
        x = to_float(images)
        h, w = x.shape[-2:]
        whole = (sizes[:, 0] == h) & (sizes[:, 1] == w)
        if (h, w) == (self.size, self.size) and self.crop_fraction == 1.0 and bool(whole.all()):
            return self.normalize(x)  # in-memory square images at the network's size: nothing to resize
        return self.normalize(resized_crop(x, center_boxes(sizes, self.crop_fraction), sizes, self.size,
                                           kind=self.interpolation))


class ProbeCrops(nn.Module):
    """Random resized crop + flip for training the offline linear probe, fixed per sample.

    The standard linear protocol (MoCo, SimCLR, solo-learn) trains the head on random crops and
    flips and tests on centre crops. Here the features of ``copies`` augmented versions of each
    image are extracted once; copy ``c`` of sample ``i`` always gets the same crop, keyed by
    ``(seed, c, i)`` like the training views, so the features do not depend on batch order or on how
    the data are sharded over ranks.
    """

    def __init__(self, normalize: EvalTransform, copy: int, seed: int = 0, crop_scale=(0.08, 1.0),
                 crop_ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5):
        super().__init__()
        self.normalize, self.size, self.flip_prob = normalize, normalize.size, float(flip_prob)
        self.copy, self.seed = int(copy), int(seed)
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sizes: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
        sizes_cpu = sizes.cpu()
        u = keyed_uniform(self.seed, self.copy, indexes.cpu(), "probe_crops", 4 * CROP_TRIES + 1)
        orig = random_resized_crop_boxes(u[:, :4 * CROP_TRIES], sizes_cpu[:, 2], sizes_cpu[:, 3], self.crop_scale,
                                         self.crop_ratio)
        flip = u[:, -1] < self.flip_prob
        x = resized_crop(to_float(images), to_canvas(orig, sizes_cpu).float(), sizes, self.size, flip)
        return self.normalize.normalize(x)


def build_augment(acfg, size: int, mean, std, seed: int = 0) -> MultiViewAugment:
    """From the ``augment`` config: ``views`` maps view name -> settings (missing keys: ``all_views``,
    then the defaults); a view set to null is left out (e.g. DINO's local views in a 2-crop recipe)."""
    from omegaconf import OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})

    views = {name: v for name, v in plain(acfg.views).items() if v is not None}
    base = plain(acfg.get("all_views") or {})
    merged = {name: {**base, **(v or {})} for name, v in views.items()}
    return MultiViewAugment(size, merged, mean, std, seed)
