"""Robust decoding: every common image mode comes out as RGB uint8; broken files are skipped, named
once and counted, and a run over a folder holding them pre-trains and probes."""

import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vision.data import ImageFiles, SkippedFilesReport, SkipUnreadable, SSLDataModule, load_image

COLOR = (200, 40, 90)


def png16_rgb(path, rgb16, size=(6, 4)):
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), every pixel ``rgb16``."""
    w, h = size
    row = b"\x00" + struct.pack(">" + "H" * 3 * w, *(list(rgb16) * w))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * h))
                     + chunk(b"IEND", b""))


def palette_png(path, transparency: bool):
    img = Image.new("P", (8, 6), 0)
    img.putpalette([*COLOR, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 1)  # one transparent / green pixel in the corner
    img.save(path, transparency=1) if transparency else img.save(path)


def write(kind, path):
    """Write one image of ``kind``; return the RGB colour its center must decode to, and a tolerance."""
    if kind == "rgb_jpeg":
        Image.new("RGB", (40, 30), COLOR).save(path, quality=95)
        return COLOR, 6
    if kind == "large_jpeg":  # decoded in draft mode (reduced DCT scale)
        arr = np.zeros((768, 1024, 3), dtype=np.uint8)
        arr[:] = COLOR
        arr[:, :128] = 0  # cropped away by the center square
        Image.fromarray(arr).save(path, quality=95)
        return COLOR, 6
    if kind == "gray_jpeg":
        Image.new("L", (30, 40), 128).save(path, quality=95)
        return (128, 128, 128), 3
    if kind == "gray_png":
        Image.new("L", (30, 40), 77).save(path)
        return (77, 77, 77), 0
    if kind == "rgba_png":
        Image.new("RGBA", (16, 16), (*COLOR, 100)).save(path)
        return COLOR, 0
    if kind == "la_png":
        Image.new("LA", (16, 16), (50, 20)).save(path)
        return (50, 50, 50), 0
    if kind == "cmyk_jpeg":
        Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
        return (255, 0, 0), 6
    if kind == "gray16_png":
        Image.fromarray(np.full((12, 16), 128 * 257, dtype=np.uint16)).save(path)
        return (128, 128, 128), 0
    if kind == "rgb16_png":
        png16_rgb(path, (65535, 0, 30 * 257))
        return (255, 0, 30), 0
    if kind == "palette_png":
        palette_png(path, transparency=False)
        return COLOR, 0
    if kind == "palette_transparent_png":
        palette_png(path, transparency=True)
        return COLOR, 0
    if kind == "bilevel_png":
        Image.new("1", (16, 16), 1).save(path)
        return (255, 255, 255), 0
    if kind == "webp":
        Image.new("RGB", (20, 20), COLOR).save(path, lossless=True)
        return COLOR, 0
    if kind == "gif":
        Image.new("RGB", (20, 20), COLOR).convert("P").save(path)
        return COLOR, 8
    if kind in ("bmp", "tiff"):
        Image.new("RGB", (20, 20), COLOR).save(path)
        return COLOR, 0
    raise ValueError(kind)


SUFFIX = {"webp": ".webp", "gif": ".gif", "bmp": ".bmp", "tiff": ".tif"}
KINDS = ["rgb_jpeg", "large_jpeg", "gray_jpeg", "gray_png", "rgba_png", "la_png", "cmyk_jpeg", "gray16_png",
         "rgb16_png", "palette_png", "palette_transparent_png", "bilevel_png", "webp", "gif", "bmp", "tiff"]


def image_file(tmp_path, kind):
    path = tmp_path / f"{kind}{SUFFIX.get(kind, '.jpg' if 'jpeg' in kind else '.png')}"
    return path, *write(kind, path)


@pytest.mark.parametrize("kind", KINDS)
def test_every_mode_decodes_to_rgb_uint8(tmp_path, kind):
    path, color, tol = image_file(tmp_path, kind)
    with Image.open(path) as img:
        source_mode = img.mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        out, size = load_image(path, 12)
    assert out.shape == (3, 12, 12) and out.dtype == torch.uint8, source_mode
    h, w = size[:2].tolist()  # the image keeps its aspect ratio at the canvas' top-left
    center = out[:, h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2].float().mean((1, 2))
    assert (center - torch.tensor(color, dtype=torch.float)).abs().max() <= tol, (source_mode, center.tolist())


def test_the_modes_under_test_are_the_ones_meant():
    """Guards the test above: PIL really opens these files in the awkward modes."""
    with tempfile.TemporaryDirectory() as d:
        modes = {k: Image.open(image_file(Path(d), k)[0]).mode for k in KINDS}
    assert modes["cmyk_jpeg"] == "CMYK" and modes["gray16_png"].startswith("I") and modes["rgba_png"] == "RGBA"
    assert modes["palette_png"] == "P" and modes["la_png"] == "LA" and modes["bilevel_png"] == "1"


# --- broken files ------------------------------------------------------------------------------------


def write_tree_with_broken_files(root, good_per_class=10):
    """Two classes of good images plus the awkward ones: (broken names, awkward-but-fine names)."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(good_per_class):
            arr = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"good{i}.{'jpg' if i % 2 else 'png'}")
    full = root / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.jpg").write_text("this is a text file, renamed .jpg\n")
    write("cmyk_jpeg", root / "dog" / "cmyk.jpg")
    write("gray16_png", root / "cat" / "sixteen.png")
    return ["truncated.jpg", "empty.jpg", "notes.jpg"], ["cmyk.jpg", "sixteen.png"]


def skipped_warnings(records):
    return [r.getMessage() for r in records if r.getMessage().startswith("skipping unreadable image")]


def test_broken_files_are_skipped_named_once_and_counted(tmp_path, make_cfg, caplog):
    broken, fine = write_tree_with_broken_files(tmp_path)
    dm = SSLDataModule(make_cfg("data=imagefolder", f"data.path={tmp_path}", "data.image_size=16",
                                "data.canvas_size=20", "data.batch_size=4", "data.num_workers=0",
                                "data.val_fraction=0.1").data)
    dm.setup()
    files = len(dm.probe_train_set) + len(dm.val_set)
    assert files == 25
    caplog.set_level(logging.WARNING, logger="ssl_vision.data")
    for epoch in range(2):
        seen = 0
        for loader in dm.probe_dataloaders(batch_size=4):
            for images, _, labels, idx in loader:
                assert images.dtype == torch.uint8 and images.shape[1:] == (3, 20, 20)
                assert len(images) == len(labels) == len(idx) and labels.min() >= 0
                seen += len(images)
        assert seen == files - 3 and dm.take_skipped() == 3  # every epoch
    named = skipped_warnings(caplog.records)
    assert len(named) == 3  # one per file, not one per epoch
    for name in broken:
        assert sum(name in w for w in named) == 1
    for name in fine:
        assert not any(name in w for w in named)
    assert dm.report_skipped() == 0  # nothing since the last count


def test_workers_count_skipped_files_together(tmp_path, capfd):
    """Two worker processes: the count is shared, each file is named once over two epochs."""
    broken, _ = write_tree_with_broken_files(tmp_path, good_per_class=3)
    paths = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    ds = ImageFiles(paths, [0] * len(paths), 8)
    handler = logging.StreamHandler(sys.stderr)  # the workers' records reach the captured stderr
    logger = logging.getLogger("ssl_vision.data")
    logger.addHandler(handler)
    try:
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True,
                                             collate_fn=SkipUnreadable(8))
        for _ in range(2):
            n = sum(len(images) for images, _, _, _ in loader)
            assert n == len(paths) - 3 and ds.take_skipped() == 3
        del loader
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    for name in broken:
        assert err.count(name) == 1, err


def test_a_batch_of_only_broken_files_is_empty_not_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("nope")
    ds = ImageFiles([tmp_path / "a.jpg", tmp_path / "b.png"], [0, 1], 10)
    images, sizes, labels, idx = next(iter(torch.utils.data.DataLoader(ds, batch_size=2,
                                                                       collate_fn=SkipUnreadable(10))))
    assert images.shape == (0, 3, 10, 10) and images.dtype == torch.uint8 and sizes.shape == (0, 4)
    assert labels.shape == idx.shape == (0,) and labels.dtype == idx.dtype == torch.long


def test_pretraining_batches_keep_their_size_by_repeating_readable_samples(tmp_path, make_cfg):
    """A short batch would break the MoCo v2 queue (whole batches) and DDP gathers (one shape)."""
    broken, _ = write_tree_with_broken_files(tmp_path, good_per_class=2)
    paths = sorted(p for p in tmp_path.rglob("*") if p.is_file())  # 4 good, 2 awkward, 3 broken
    ds = ImageFiles(paths, list(range(len(paths))), 8)
    broken_idx = {i for i, p in enumerate(paths) if p.name in broken}
    images, sizes, labels, idx = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(paths),
                                                                       collate_fn=SkipUnreadable(8, refill=True))))
    assert images.shape == (9, 3, 8, 8) and labels.shape == idx.shape == (9,) and ds.take_skipped() == 3
    assert sizes.shape == (9, 4)
    assert len(set(idx.tolist())) == 6 and not set(idx.tolist()) & broken_idx  # fillers: readable samples
    assert torch.equal(labels, idx)  # each filler is a whole sample: image, label and index together
    for i, j in zip(idx.tolist(), range(9)):
        assert torch.equal(images[j], ds[i][0]) and torch.equal(sizes[j], ds[i][1])
    # the DataModule refills its pre-training batches only; evaluation sees each readable image once
    dm = SSLDataModule(make_cfg("data=imagefolder", f"data.path={tmp_path}", "data.image_size=8", "data.canvas_size=8",
                                "data.batch_size=2", "data.num_workers=0").data)
    dm.setup()
    assert dm.train_dataloader().collate_fn.refill
    assert not any(loader.collate_fn.refill for loader in dm.probe_dataloaders())


class _MeanColour(L.LightningModule):
    """The smallest model that trains on the (images, sizes, labels, indexes) batches."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        images = batch[0]
        if len(images) == 0:
            return None
        return self.w(images.float().mean((2, 3)) / 255).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skipped_files_report_logs_the_count_every_epoch(tmp_path, make_cfg, caplog):
    write_tree_with_broken_files(tmp_path / "train", good_per_class=4)
    write_tree_with_broken_files(tmp_path / "val", good_per_class=2)
    dm = SSLDataModule(make_cfg("data=imagefolder", f"data.path={tmp_path}", "data.image_size=8", "data.canvas_size=8",
                                "data.batch_size=2", "data.num_workers=0").data)
    caplog.set_level(logging.WARNING, logger="ssl_vision.data")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[SkippedFilesReport()])
    trainer.fit(_MeanColour(), datamodule=dm)
    # train: 3 broken files in the shuffled, drop_last loader (13 files, batches of 2: one may be
    # dropped); validation: all 3 of its broken files
    reports = [r.getMessage() for r in caplog.records if "unreadable files this epoch" in r.getMessage()]
    assert len(reports) == 2, reports
    for epoch, msg in enumerate(reports):
        n = int(msg.split()[1])
        assert msg.startswith(f"skipped {n} unreadable files this epoch (epoch {epoch})") and 5 <= n <= 6
    assert len(skipped_warnings(caplog.records)) == 6  # each file named once over both epochs


def test_pretrain_and_probe_over_a_folder_with_broken_files(tmp_path):
    """The whole CLI: a short real pre-training and both probes, broken files named in the output."""
    data = tmp_path / "data"
    broken, fine = write_tree_with_broken_files(data, good_per_class=16)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ssl_vision.train", "data=imagefolder", f"data.path={data}",
                        "backbone=resnet18_tiny", "data.image_size=16", "data.canvas_size=20",
                        "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
                        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "eval.linear.epochs=5",
                        "eval.random_init_baseline=false",
                        f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny model: threads only cost time
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] > 0 and 0 <= summary["linear_probe_top1"] <= 1 and 0 <= summary["knn_top1"] <= 1
    for name in broken:
        assert f"{name}' (" in out, name
    for name in fine:
        assert name not in out
