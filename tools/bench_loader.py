"""Images per second of ssl-vision's CPU loader on a folder of full-size JPEGs.

    python tools/bench_loader.py                      # 200 synthetic 1024x768 JPEGs in a temp dir
    python tools/bench_loader.py --path /data/imagenet/train/n01440764 --workers 0 2 8

Runs the real path - ``SSLDataModule`` (``data=imagefolder data.labels=false``), its training
loader: decode (JPEG draft mode), shrink the image to fit the uint8 canvas (aspect ratio kept), collate -
for each worker count, and
prints images/s of the best of ``--epochs`` epochs after a warm-up epoch (worker start-up and the
page cache are not measured). Augmentation is not part of it: it runs later, on the device.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageFilter


def make_jpegs(folder: Path, n: int, size=(1024, 768), seed: int = 0) -> None:
    """Photo-like JPEGs: a smooth random colour field plus blurred texture noise, quality 90 - about
    130 KB at 1024x768, like a camera photo of that size (pure noise would be 3x larger and slower)."""
    rng = np.random.default_rng(seed)
    w, h = size
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noise = Image.fromarray(rng.integers(96, 161, (h, w), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
        arr = np.asarray(field, dtype=np.int16) + (np.asarray(noise, dtype=np.int16)[..., None] - 128) * 2
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)


def images_per_second(path: Path, workers: int, canvas: int, batch_size: int, epochs: int) -> tuple[float, int]:
    from ssl_vision.data import SSLDataModule

    cfg = OmegaConf.create({
        "name": "imagefolder", "path": str(path), "labels": False, "label_fraction": None,
        "image_size": min(canvas, 224), "canvas_size": canvas, "eval_crop_fraction": 0.875, "val_fraction": 0.0, "seed": 0,
        "batch_size": batch_size, "num_workers": workers, "mean": [0.5] * 3, "std": [0.5] * 3,
    })
    dm = SSLDataModule(cfg)
    dm.setup()
    loader = dm.train_dataloader()
    best, n = 0.0, 0
    for epoch in range(epochs + 1):
        start, n = time.perf_counter(), 0
        for images, *_ in loader:
            n += len(images)
        rate = n / (time.perf_counter() - start)
        if epoch > 0:  # epoch 0 warms up: worker start-up, page cache
            best = max(best, rate)
    return best, n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", type=Path, default=None, help="folder of images (default: generate synthetic JPEGs)")
    p.add_argument("--num-images", type=int, default=200, help="synthetic JPEGs to generate")
    p.add_argument("--size", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"))
    p.add_argument("--canvas", type=int, default=512, help="data.canvas_size, the long side (data=imagenet: 512)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            path = Path(tmp) / "jpegs"
            t = time.perf_counter()
            make_jpegs(path, args.num_images, tuple(args.size))
            mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
            print(f"generated {args.num_images} {args.size[0]}x{args.size[1]} JPEGs ({mb:.0f} MB) "
                  f"in {time.perf_counter() - t:.1f} s")
        print(f"{path}: canvas {args.canvas}, batch {args.batch_size}, {os.cpu_count()} CPUs")
        for w in args.workers:
            rate, n = images_per_second(path, w, args.canvas, args.batch_size, args.epochs)
            print(f"num_workers={w}: {rate:7.1f} images/s ({n} images per epoch)")


if __name__ == "__main__":
    main()
