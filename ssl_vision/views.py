"""``ssl-vision-views``: the training views a config draws, as a picture and as numbers.

Takes the training config (``ssl-vision-views method=moco_v3 data=imagefolder data.path=/imgs``),
picks ``show.images`` training images with ``seed``, and draws each method view exactly as training
would in epoch ``show.epoch`` (the draws are keyed by seed, epoch and image: ``ssl_vision.rng``).
Writes into the Hydra run directory:

- ``views.png``: a row per image - the image with every view's crop box outlined in that view's
  colour, then each view (de-normalized, enlarged to one height);
- ``views.json``: ``{"views": {name: settings}, "crops": [{"index", "view", "image_size": [h, w],
  "box": [x0, y0, x1, y1], "flip"}]}`` with boxes in the original image's pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from .augment import build_augment
from .cli import entry_point
from .config import ConfigError
from .data import SkipUnreadable, SSLDataModule

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
ROW = 128  # display height of every tile, pixels


def _tile(chw: torch.Tensor, height: int = ROW) -> Image.Image:
    arr = (chw.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(np.ascontiguousarray(arr))
    w = max(1, round(img.width * height / img.height))
    return img.resize((w, height), Image.NEAREST if img.height < height else Image.BILINEAR)


def render(images, sizes, views, plans, names, mean, std) -> Image.Image:
    """The picture: per image, the original with the view boxes, then the views."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    rows = []
    for i in range(len(images)):
        h, w = int(sizes[i, 0]), int(sizes[i, 1])
        original = _tile(images[i, :, :h, :w].float() / 255)
        draw = ImageDraw.Draw(original)
        s = ROW / h
        for k, plan in enumerate(plans):
            x0, y0, x1, y1 = (float(c) * s for c in plan["boxes"][i])
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=COLOURS[k % len(COLOURS)], width=2)
        tiles = [original] + [_tile(v[i] * std + mean) for v in views]
        rows.append(tiles)
    gap = 6
    width = max(sum(t.width for t in r) + gap * len(r) for r in rows)
    header = 16
    sheet = Image.new("RGB", (width, header + len(rows) * (ROW + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    x = rows[0][0].width + gap
    for k, name in enumerate(names):
        draw.text((x, 2), name, fill=COLOURS[k % len(COLOURS)])
        x += rows[0][k + 1].width + gap
    for r, tiles in enumerate(rows):
        x = 0
        for t in tiles:
            sheet.paste(t, (x, header + r * (ROW + gap)))
            x += t.width + gap
    return sheet


def show_views(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.get("run_dir", "views"))
    out.mkdir(parents=True, exist_ok=True)
    n, epoch = int(cfg.show.images), int(cfg.show.epoch)
    if n < 1:
        raise ConfigError(f"show.images: {n}; show at least 1 image")
    dm = SSLDataModule(cfg.data)
    dm.setup()
    data = dm.pretrain_set
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(int(cfg.seed)))[:n].sort().values
    images, sizes, _, indexes = SkipUnreadable(cfg.data.canvas_size)([data[int(i)] for i in picks])
    if len(images) == 0:
        raise ConfigError(f"data.path: none of the {len(picks)} picked images could be read; try another seed")
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    aug = build_augment(cfg.augment, int(cfg.data.image_size), mean, std, seed=int(cfg.seed))
    plans = aug.plan(sizes, indexes, epoch)
    views = aug.apply(images, sizes, plans)
    crops = [{"index": int(indexes[i]), "view": name, "image_size": [int(sizes[i, 2]), int(sizes[i, 3])],
              "box": [int(c) for c in plan["boxes_orig"][i]], "flip": bool(plan["flip"][i])}
             for i in range(len(images)) for name, plan in zip(aug.names, plans)]
    record = {"method": cfg.method.name, "data": cfg.data.name, "seed": int(cfg.seed), "epoch": epoch,
              "views": {name: v for name, v in zip(aug.names, aug.views)}, "crops": crops}
    (out / "views.json").write_text(json.dumps(record, indent=2) + "\n")
    render(images, sizes, views, plans, aug.names, mean, std).save(out / "views.png")
    print(f"wrote {out / 'views.png'} and {out / 'views.json'}: {len(images)} images x {len(aug.names)} views "
          f"({', '.join(f'{name} {size} px' for name, size in zip(aug.names, aug.sizes))})")
    return record


main = entry_point("views", show_views)

if __name__ == "__main__":
    main()
