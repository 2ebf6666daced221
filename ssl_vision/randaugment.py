"""RandAugment and random erasing on the device: timm's fine-tuning augmentation, per sample, keyed.

The MAE / BEiT / DeiT fine-tuning recipes build their training transform with ``timm.data.create_transform``
(facebookresearch/mae ``util/datasets.py``: ``auto_augment='rand-m9-mstd0.5-inc1'``, ``re_prob=0.25``,
``re_mode='pixel'``, ``re_count=1``, ``interpolation='bicubic'``): random resized crop + flip, then
RandAugment on the 8-bit PIL image (``timm/data/auto_augment.py``), then ``ToTensor`` + normalize, then
``RandomErasing`` on the normalized tensor (``timm/data/random_erasing.py``). Here the crop and flip are
``MultiViewAugment``'s; ``RandAugment`` and ``RandomErasing`` below are the other two, run on the whole batch
on the device (``augment.py`` calls them for a view with ``randaugment`` / ``erase_prob`` set): every random
number is drawn on the CPU by ``plan`` from keyed uniforms (``ssl_vision.rng``: seed, epoch, sample index,
stream), every op runs on just the samples that drew it (index lists known on the host: no host sync).

**RandAugment** (``rand-m9-mstd0.5-inc1``: timm's config grammar - ``m`` magnitude, ``n`` ops per image
(default 2), ``p`` each op's probability (0.5), ``mstd`` magnitude std (``> 100``: uniform in [0, m]),
``mmax`` magnitude ceiling (10), ``inc1`` the "increasing" op set). Per image and per layer, as timm's
``RandAugment`` / ``AugmentOp``: one op of the 15 uniformly, with replacement (``np.random.choice``); it is
applied with probability ``p`` (timm skips it when ``random() > p``); magnitude ``N(m, mstd)`` clipped to
[0, ``mmax``]; the sign of rotate / shear / translate / enhance amounts flipped with probability 1/2.
Each op's level-to-argument mapping is timm's (``LEVEL_TO_ARG``), in float64 with Python's truncations.

Differences from timm 1.0 (MAE pins timm 0.3.2, whose RandAugment ops, level mappings and defaults are
the same), each below what a fine-tuning result can measure:

- The image is float in [0, 1] throughout; PIL rounds to 8 bits after every op (RandAugment sees the
  crop's 8-bit output, each op's 8-bit result feeds the next). Ops that act on 8-bit levels - Equalize,
  Posterize, Solarize, SolarizeAdd - read ``round(255 x)`` and are exact on 8-bit input; the others
  differ from PIL by its rounding (at most 1 level in 255 on 8-bit input; ``tests/test_finetune.py``
  compares every op with timm's on an image).
- AutoContrast maps [min, max] of each channel to [0, 1] without PIL's truncation to levels; Color and
  Contrast use PIL's grayscale weights (299, 587, 114) / 1000 without rounding the gray image to 8 bits
  (Contrast's mean is rounded to a level, as PIL does); Sharpness blends with PIL's 3x3 SMOOTH filter
  (border pixels unchanged, as PIL) without rounding it.
- The geometric ops (Rotate, ShearX / Y, TranslateX / YRel) are PIL's affine transform: output pixel
  centres mapped through the same matrix, samples outside the image take the fill colour (the data mean in
  8 bits, timm's ``img_mean``), edge pixels repeated for the filter taps, and PIL's transform filters -
  its bicubic is the cubic with a = -1 (PIL's *resize* uses a = -0.5; torch's ``grid_sample`` -0.75, so it
  is not used), bilinear as PIL. The filter is the view's ``interpolation`` (MAE: bicubic); timm's
  ``interpolation='random'`` choice per image is not offered.
- PosterizeIncreasing at magnitude 10 (and Posterize below 2.5) keeps 0 bits: a black image, as ``ImageOps.posterize``
  did when MAE was written; recent Pillow (13 here) raises instead, so timm's CPU pipeline fails on such a draw.
- Random numbers: keyed hashes instead of Python's ``random`` and NumPy's global generators (the same
  distributions; magnitudes by Box-Muller), so an image's draws do not depend on the rank, batch or resume.
  timm's weighted op sets (``t...`` in the config string) are not implemented: a ``ConfigError`` says so.

**Random erasing** (``RandomErasing(probability, mode='pixel', max_count=1)`` - Zhong et al.): on the
normalized image; timm's call on a batch loops over the samples, each with its own draws, and so does this
one: with probability ``erase_prob`` a box of area ``U(0.02, 1/3)`` of the image and aspect
``exp(U(log 0.3, log 1/0.3))`` (``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``,
10 tries until ``h < H`` and ``w < W``, top / left uniform over the integer positions) is filled with
per-pixel N(0, 1) noise. The box is keyed like every other draw; the noise values come from torch's
generator on the device (timm's ``normal_()`` too), which checkpoints save and a resumed run restores.
"""

from __future__ import annotations

import math
import re

import torch

from .config import ConfigError

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude m -> level fraction m / 10

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS (the order timm draws from)
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TRANSLATE_PCT = 0.45  # timm's default hparams['translate_pct']
PIL_GRAY = (0.299, 0.587, 0.114)  # PIL's convert("L"): (R * 299 + G * 587 + B * 114) / 1000
DRAWS_PER_LAYER = 5  # op choice, apply, two uniforms for the Gaussian magnitude, sign

ERASE_TRIES = 10
ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing's min_area, max_area
ERASE_ASPECT = (math.log(0.3), math.log(1 / 0.3))  # min_aspect 0.3, max_aspect 1 / 0.3
ERASE_DRAWS = 1 + 4 * ERASE_TRIES


def parse_config(text: str, key: str = "randaugment") -> dict:
    """timm's RandAugment config string (``rand-m9-mstd0.5-inc1``) -> its settings, or a ``ConfigError``."""
    parts = str(text).split("-")
    if parts[0] != "rand":
        raise ConfigError(f"{key}: '{text}' is not a RandAugment config; use timm's form, e.g. rand-m9-mstd0.5-inc1")
    out = {"magnitude": LEVEL_DENOM, "num_layers": 2, "prob": 0.5, "magnitude_std": 0.0, "magnitude_max": LEVEL_DENOM,
           "increasing": False}
    for part in parts[1:]:
        if part.startswith("t"):
            raise ConfigError(f"{key}: '{text}': timm's weighted op sets ('{part}') are not implemented on the device; "
                              "leave out the t... section (uniform choice over the 15 ops)")
        found = re.fullmatch(r"([a-z]+)(\d.*)", part)
        try:
            name, value = found.group(1), float(found.group(2))
        except (AttributeError, ValueError):
            raise ConfigError(f"{key}: cannot read '{part}' in '{text}'; sections are m<int>, n<int>, p<float>, "
                              "mstd<float>, mmax<int>, inc<0|1>") from None
        if name == "m":
            out["magnitude"] = float(int(value))
        elif name == "n":
            out["num_layers"] = int(value)
        elif name == "p":
            out["prob"] = value
        elif name == "mstd":
            out["magnitude_std"] = math.inf if value > 100 else value
        elif name == "mmax":
            out["magnitude_max"] = float(int(value))
        elif name == "inc":
            out["increasing"] = bool(int(value))
        else:
            raise ConfigError(f"{key}: unknown section '{part}' in '{text}'; sections are m, n, p, mstd, mmax, inc")
    if not 0 <= out["prob"] <= 1 or out["num_layers"] < 1:
        raise ConfigError(f"{key}: '{text}' needs n >= 1 and p in [0, 1]")
    return out


# --- each op's argument from its magnitude (timm's LEVEL_TO_ARG, vectorized in float64) -------------------


def _signed(value: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    return torch.where(negate, -value, value)  # timm's _randomly_negate


def op_argument(name: str, magnitude: torch.Tensor, negate: torch.Tensor, size: int) -> torch.Tensor:
    """The argument timm passes to op ``name`` for float64 ``magnitude`` (B,) (already clipped) and sign
    flips ``negate`` (B,): an (B,) level, or for the geometric ops (B, 6) PIL affine matrices (output pixel
    centre -> input position) of a ``size`` x ``size`` image."""
    level = magnitude / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return torch.zeros_like(level)
    if name == "Posterize":
        return torch.floor(level * 4)  # bits kept
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(level * 4)
    if name == "Solarize":
        return torch.clamp(torch.floor(level * 256), max=256)  # threshold
    if name == "SolarizeIncreasing":
        return 256 - torch.clamp(torch.floor(level * 256), max=256)
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(level * 110), max=128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name.endswith("Increasing"):  # ColorIncreasing, ... : 1 +- 0.9 level, at least 0.1
        return torch.clamp(1.0 + _signed(level * 0.9, negate), min=0.1)
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    if name == "Rotate":  # PIL's Image.rotate about the centre: angle -> inverse matrix
        angle = -torch.deg2rad(_signed(level * 30.0, negate))
        a, b = torch.round(torch.cos(angle) * 1e15) / 1e15, torch.round(torch.sin(angle) * 1e15) / 1e15
        c = size / 2.0
        return torch.stack([a, b, a * -c + b * -c + c, -b, a, -b * -c + a * -c + c], dim=1)
    if name == "ShearX":
        return torch.stack([one, _signed(level * 0.3, negate), zero, zero, one, zero], dim=1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, _signed(level * 0.3, negate), one, zero], dim=1)
    if name == "TranslateXRel":
        return torch.stack([one, zero, _signed(level * TRANSLATE_PCT, negate) * size, zero, one, zero], dim=1)
    if name == "TranslateYRel":
        return torch.stack([one, zero, zero, zero, one, _signed(level * TRANSLATE_PCT, negate) * size], dim=1)
    raise ValueError(f"unknown RandAugment op {name}")


# --- the ops on float images (B, 3, H, W) in [0, 1] -----------------------------------------------------------


def _levels(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255.0)


def _per_sample(a: torch.Tensor) -> torch.Tensor:
    return a.view(-1, 1, 1, 1).to(torch.float32)


def pil_gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (PIL_GRAY[0] * r + PIL_GRAY[1] * g + PIL_GRAY[2] * b).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` (ImageEnhance), clipped."""
    return (degenerate + _per_sample(factor) * (x - degenerate)).clamp(0, 1)


def auto_contrast(x, _arg=None):
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), x)


def equalize(x, _arg=None):
    """PIL's ``ImageOps.equalize`` per channel on 8-bit levels: lut[i] = (step // 2 + #pixels below i) // step,
    step = (#pixels - #pixels at the highest level present) // 255; unchanged when step is 0."""
    b, c, h, w = x.shape
    q = _levels(x).long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last = 255 - (hist.flip(1) > 0).long().argmax(dim=1, keepdim=True)  # highest level present
    step = (h * w - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = torch.div(step // 2 + below, step.clamp(min=1), rounding_mode="floor").clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand_as(lut))
    return (lut.gather(1, q).float() / 255.0).view(b, c, h, w)


def invert(x, _arg=None):
    return 1.0 - x


def posterize(x, bits):
    unit = _per_sample(torch.pow(2.0, 8 - bits))
    q = _levels(x)
    return torch.where(_per_sample(bits) >= 8, x, (q - torch.remainder(q, unit)) / 255.0)


def solarize(x, threshold):
    return torch.where(_levels(x) < _per_sample(threshold), x, 1.0 - x)


def solarize_add(x, add):
    return torch.where(_levels(x) < 128, (x + _per_sample(add) / 255.0).clamp(max=1.0), x)


def color(x, factor):
    return _blend(pil_gray(x).expand_as(x), x, factor)


def contrast(x, factor):
    mean = torch.floor(pil_gray(x).mean(dim=(-3, -2, -1), keepdim=True) * 255.0 + 0.5) / 255.0
    return _blend(mean.expand_as(x), x, factor)


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x, factor):
    """Blend with PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; the border pixels unchanged)."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    c = x.shape[1]
    smooth = x.clone()
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        smooth[..., 1:-1, 1:-1] = torch.nn.functional.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    return _blend(smooth, x, factor)


def _cubic(d: torch.Tensor, a: float = -1.0) -> list[torch.Tensor]:
    """Weights of the taps at offsets -1, 0, 1, 2 for fractions ``d``: the cubic convolution kernel with ``a``
    (PIL's transform: a = -1, libImaging/Geometry.c BICUBIC)."""
    def k(t):
        t = t.abs()
        return torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                           torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, torch.zeros_like(t)))
    return [k(d + 1), k(d), k(1 - d), k(2 - d)]


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor, kind: str = "bicubic") -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, matrix, resample, fillcolor)`` per sample: output pixel (i, j) reads
    the input at ``(a (j + .5) + b (i + .5) + c, d (j + .5) + e (i + .5) + f)``; a position outside the image
    takes ``fill`` (3,); inside, the filter's taps around it (edge pixels repeated) are weighted."""
    b, ch, h, w = x.shape
    m = matrix.to(x.device, torch.float32)
    ys, xs = (torch.arange(n, device=x.device, dtype=torch.float32) + 0.5 for n in (h, w))
    yy, xx = ys.view(1, h, 1), xs.view(1, 1, w)
    xin = m[:, 0, None, None] * xx + m[:, 1, None, None] * yy + m[:, 2, None, None]  # (B, H, W)
    yin = m[:, 3, None, None] * xx + m[:, 4, None, None] * yy + m[:, 5, None, None]
    inside = (xin >= 0) & (yin >= 0) & (xin < w) & (yin < h)
    px, py = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(px), torch.floor(py)
    dx, dy = px - x0, py - y0
    if kind == "bicubic":
        offsets, wx, wy = (-1, 0, 1, 2), _cubic(dx), _cubic(dy)
    else:  # bilinear
        offsets, wx, wy = (0, 1), [1 - dx, dx], [1 - dy, dy]
    flat = x.reshape(b, ch, h * w)
    out = torch.zeros_like(flat)
    for oy, wgt_y in zip(offsets, wy):
        row = (y0.long() + oy).clamp(0, h - 1) * w
        for ox, wgt_x in zip(offsets, wx):
            idx = (row + (x0.long() + ox).clamp(0, w - 1)).view(b, 1, h * w).expand(b, ch, h * w)
            out += flat.gather(2, idx) * (wgt_y * wgt_x).view(b, 1, h * w)
    out = out.view(b, ch, h, w).clamp(0, 1)
    return torch.where(inside[:, None], out, fill.to(x).view(1, -1, 1, 1))


OP_FUNCTIONS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Posterize": posterize, "PosterizeIncreasing": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness, "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness,
}


class RandAugment:
    """timm's RandAugment from its config string, for images of ``size`` px, ``fill`` the 8-bit fill colour
    (timm: ``round(255 * mean)``) of the geometric ops, ``kind`` their filter (bilinear | bicubic)."""

    def __init__(self, config: str, size: int, fill, kind: str = "bicubic"):
        self.settings = parse_config(config)
        self.ops = RAND_INCREASING_TRANSFORMS if self.settings["increasing"] else RAND_TRANSFORMS
        self.size, self.kind = int(size), kind
        self.fill = torch.tensor([float(v) for v in fill], dtype=torch.float32) / 255.0

    @property
    def num_draws(self) -> int:
        return DRAWS_PER_LAYER * self.settings["num_layers"]

    def magnitudes(self, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        """float64 magnitudes from two uniforms per sample: N(m, mstd) (Box-Muller), uniform in [0, m] for
        mstd = inf, m for mstd = 0; clipped to [0, mmax] (timm's AugmentOp.__call__)."""
        s = self.settings
        m, std = s["magnitude"], s["magnitude_std"]
        if std == math.inf:
            mag = u1 * m
        elif std > 0:
            mag = m + std * torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)
        else:
            mag = torch.full_like(u1, m)
        return mag.clamp(0.0, s["magnitude_max"])

    @torch.no_grad()
    def plan(self, u: torch.Tensor) -> dict:
        """All draws of a batch from ``u`` (B, ``num_draws``) uniforms (CPU): the samples each layer's ops touch,
        as one index tensor sliced per (layer, op) (``slices``), and aligned with it each entry's level
        (``values``) or, for the geometric ops (one affine pass per layer), its matrix (``matrices``)."""
        s = self.settings
        n = s["num_layers"]
        u = u.double().view(len(u), n, DRAWS_PER_LAYER)
        choice = torch.floor(u[..., 0] * len(self.ops)).long().clamp(max=len(self.ops) - 1)
        applied = u[..., 1] <= s["prob"]  # timm: skipped when random() > prob
        magnitude = self.magnitudes(u[..., 2], u[..., 3])
        negate = u[..., 4] > 0.5  # timm's _randomly_negate: -v if random() > 0.5
        index, values, matrices, slices, start = [], [], [], {}, 0
        for t in range(n):
            geometric = []
            for k, name in enumerate(self.ops):
                idx = torch.nonzero(applied[:, t] & (choice[:, t] == k))[:, 0]
                if len(idx) == 0:
                    continue
                value = op_argument(name, magnitude[idx, t], negate[idx, t], self.size)
                if name in GEOMETRIC:
                    geometric.append((idx, value))
                    continue
                index.append(idx)
                values.append(value.float())
                matrices.append(torch.zeros(len(idx), 6, dtype=torch.float64))
                slices[f"{t}:{name}"] = (start, start + len(idx))
                start += len(idx)
            if geometric:
                idx = torch.cat([g[0] for g in geometric])
                index.append(idx)
                values.append(torch.zeros(len(idx)))
                matrices.append(torch.cat([g[1] for g in geometric]))
                slices[f"{t}:affine"] = (start, start + len(idx))
                start += len(idx)
        if not index:
            return {"index": torch.zeros(0, dtype=torch.long), "values": torch.zeros(0),
                    "matrices": torch.zeros(0, 6), "slices": {}}
        return {"index": torch.cat(index), "values": torch.cat(values), "matrices": torch.cat(matrices).float(),
                "slices": slices}

    @torch.no_grad()
    def apply(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        """Run the planned ops on ``x`` (B, 3, size, size) float in [0, 1], in place; returns ``x``."""
        if not plan["slices"]:
            return x
        index, values, matrices = (plan[k].to(x.device) for k in ("index", "values", "matrices"))
        for t in range(self.settings["num_layers"]):
            for name in (*self.ops, "affine"):
                a, b = plan["slices"].get(f"{t}:{name}", (0, 0))
                if b <= a:
                    continue
                idx = index[a:b]
                z = x.index_select(0, idx)
                if name == "affine":
                    z = affine(z, matrices[a:b], self.fill, self.kind)
                else:
                    z = OP_FUNCTIONS[name](z, values[a:b])
                x.index_copy_(0, idx, z.to(x.dtype))
        return x


# --- random erasing ----------------------------------------------------------------------------------------


def erase_boxes(u: torch.Tensor, height: int, width: int, prob: float) -> torch.Tensor:
    """timm RandomErasing's box per sample from ``u`` (B, ``ERASE_DRAWS``) uniforms: (B, 4) int64
    ``(top, left, h, w)``, h = 0 where the sample is not erased (not drawn, or none of the 10 tries fit)."""
    u = u.double()
    area = height * width
    tries = u[:, 1:].view(len(u), ERASE_TRIES, 4)
    target = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * tries[..., 0]) * area  # random.uniform
    aspect = torch.exp(ERASE_ASPECT[0] + (ERASE_ASPECT[1] - ERASE_ASPECT[0]) * tries[..., 1])
    h = torch.round(torch.sqrt(target * aspect))  # int(round(...)): half to even, as Python's round
    w = torch.round(torch.sqrt(target / aspect))
    fits = (w < width) & (h < height)
    top = torch.floor(tries[..., 2] * (height - h + 1))  # random.randint(0, H - h): both ends included
    left = torch.floor(tries[..., 3] * (width - w + 1))
    first = fits.long().argmax(dim=1, keepdim=True)
    erased = (u[:, 0] <= prob) & fits.any(dim=1)  # timm: skipped when random() > probability
    pick = lambda t: torch.where(erased, t.gather(1, first)[:, 0], torch.zeros_like(t[:, 0]))  # noqa: E731
    return torch.stack([pick(top), pick(left), pick(h), pick(w)], dim=1).long()


@torch.no_grad()
def erase(x: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Fill box ``boxes[i]`` (top, left, h, w) of sample ``index[i]`` of ``x`` with N(0, 1) noise, in place."""
    if len(index) == 0:
        return x
    index = index.to(x.device)
    boxes = boxes.to(x.device)
    z = x.index_select(0, index)
    rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
    cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    top, left, h, w = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    z = torch.where(inside[:, None], torch.randn_like(z), z)
    return x.index_copy_(0, index, z)
