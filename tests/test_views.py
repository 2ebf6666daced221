"""ssl-vision-views: the picture and the boxes of the views a config draws."""

import json

import numpy as np
import torch
from PIL import Image

from ssl_vision.augment import build_augment
from ssl_vision.views import show_views


def test_views_writes_the_boxes_training_draws_in_original_pixels(tmp_path, make_cfg):
    data = tmp_path / "imgs" / "a"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(80, 60), (60, 80), (96, 54)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = make_cfg("method=moco_v3", "data=imagefolder", f"data.path={tmp_path / 'imgs'}", "data.labels=false",
                   "data.image_size=24", "data.canvas_size=48", "data.batch_size=2", "show.images=2", "seed=3",
                   "+augment.views.local.size=12", f"+run_dir={tmp_path / 'out'}", config_name="views")
    record = show_views(cfg)
    out = tmp_path / "out"
    assert json.loads((out / "views.json").read_text()) == record
    assert list(record["views"]) == ["view1", "view2", "local"] and record["views"]["local"]["size"] == 12
    crops = record["crops"]
    assert len(crops) == 2 * 3 and {c["view"] for c in crops} == {"view1", "view2", "local"}
    sizes = {0: [60, 80], 1: [80, 60], 2: [54, 96]}
    for c in crops:
        h, w = c["image_size"]
        assert c["image_size"] == sizes[c["index"]]
        x0, y0, x1, y1 = c["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # the boxes are the ones a training batch of these images draws in epoch 0 with this seed
    aug = build_augment(cfg.augment, 24, list(cfg.data.mean), list(cfg.data.std), seed=3)
    idx = torch.tensor(sorted({c["index"] for c in crops}))
    canvas = torch.tensor([[round(sizes[i][0] * 48 / max(sizes[i])), round(sizes[i][1] * 48 / max(sizes[i])),
                            *sizes[i]] for i in idx.tolist()])
    plans = aug.plan(canvas, idx, epoch=0)
    for c in crops:
        k, row = aug.names.index(c["view"]), idx.tolist().index(c["index"])
        assert plans[k]["boxes_orig"][row].tolist() == c["box"]
    png = Image.open(out / "views.png")
    assert png.height == 16 + 2 * (128 + 6) and png.width > 4 * 128
