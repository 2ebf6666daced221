"""Decoding: image files and in-memory arrays -> RGB uint8 canvases plus each image's size.

The CPU's only job in the data path. A file is decoded (JPEG at reduced size through PIL's draft
mode), converted to 8-bit RGB, shrunk - never enlarged - so that its longer side fits the square
``canvas``, keeping its aspect ratio, and placed at the canvas' top-left corner. ``sizes`` rows
``(canvas_h, canvas_w, orig_h, orig_w)`` record where the image lies on the canvas and how large
the original was, so the device can draw every crop inside each image's own extent and report it
in original pixels (``ssl_vision.augment``). The padding repeats the image's last row and column,
so a resize filter that reads a pixel past the edge sees the edge.

Resolution: a canvas of side ``C`` keeps an original of long side ``S`` at ``min(1, C / S)`` of its
linear resolution. ImageNet's typical 500 x 375 photo fits ``C = 512`` whole: it is decoded and padded,
never resized, so small crops have the source pixels torchvision has on the original JPEG (a 0.08-area
crop: 122 x 122). ``C = 342``, the least that holds the 224 px evaluation crop of a 4:3 image unenlarged,
keeps 0.68 of it (84 x 84 pixels for that crop) in 45% of the memory.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any PIL mode -> ``L`` or ``RGB`` (16-bit and float scaled, alpha dropped, palette expanded)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float32)
        if mode.startswith("I;16") or (mode == "I" and a.size and a.max() > 255):
            a = a / 257.0  # 16-bit range
        elif mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0  # float image in [0, 1]
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if mode in ("LA", "La", "1"):
        return img.convert("L")
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # the way PIL wants palette transparency expanded
    return img.convert("RGB")  # RGBA (alpha dropped, as torchvision / timm loaders do), CMYK, YCbCr, P


def fit_size(h: int, w: int, canvas: int) -> tuple[int, int]:
    """The (h, w) an original of (h, w) takes on a ``canvas``: the longer side shrunk to the canvas,
    never enlarged, aspect ratio kept."""
    s = min(1.0, canvas / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def place_on_canvas(arr: np.ndarray, canvas: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (3, canvas, canvas) with the image at the top-left and its last row and column
    repeated into the padding. HWC -> CHW in numpy: a torch copy here would start intra-op threads for
    every image, which made the single-process loader (num_workers=0) 3x slower on a busy 2-core machine."""
    h, w = arr.shape[:2]
    out = np.empty((3, canvas, canvas), dtype=np.uint8)
    out[:, :h, :w] = arr.transpose(2, 0, 1)
    if h < canvas:
        out[:, h:, :w] = out[:, h - 1 : h, :w]
    if w < canvas:
        out[:, :, w:] = out[:, :, w - 1 : w]
    return out


def load_image(path, canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an image file to ``(RGB uint8 (3, canvas, canvas), size (4,) int64)``, ``size`` being
    ``(canvas_h, canvas_w, orig_h, orig_w)``. JPEGs are decoded at the largest DCT reduction that is
    still at least the canvas extent (``draft``), so large photos decode fast."""
    with Image.open(path) as img:
        w0, h0 = img.size
        h, w = fit_size(h0, w0, canvas)
        img.draft("RGB", (w, h))  # JPEG only (no-op otherwise); keeps both sides >= (w, h)
        img = _to_8bit(img)
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR, reducing_gap=3.0)
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(place_on_canvas(arr, canvas)), torch.tensor([h, w, h0, w0], dtype=torch.long)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize a uint8 batch (N, C, H, W) to ``size`` with antialiasing; grayscale becomes RGB. For the
    in-memory data sets (digits, CIFAR, STL-10), whose square images fill their canvas. Works ``chunk``
    images at a time, so a large dataset never exists in float32 all at once."""
    if images.shape[1] == 3 and images.shape[-2:] == (size, size):
        return images
    out = []
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out.append(x.round().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out).contiguous() if out else images.new_empty(0, 3, size, size)
