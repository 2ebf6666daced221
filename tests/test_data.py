import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vision.config import ConfigError
from ssl_vision.data import SSLDataModule, load_image, stratified_split


def write_png_tree(root, classes=("cat", "dog"), per_class=6, size=(20, 14)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_digits_batches_are_uint8_canvases_with_labels_and_indexes(make_cfg):
    dm = SSLDataModule(make_cfg().data)
    dm.setup()
    assert dm.num_classes == 10
    assert len(dm.pretrain_set) + len(dm.val_set) == 1797
    images, sizes, labels, idx = next(iter(dm.train_dataloader()))
    size = make_cfg().data.image_size
    bs = make_cfg().data.batch_size
    assert images.dtype == torch.uint8 and images.shape == (bs, 3, size, size)
    assert sizes.tolist() == [[size] * 4] * bs  # in memory: every image fills its canvas
    assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() <= 9
    assert idx.shape == (bs,) and len(set(idx.tolist())) == bs


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(4), 10)
    keep, held = stratified_split(labels, 0.2, seed=1)
    assert len(held) == 8 and sorted(np.bincount(labels[held])) == [2, 2, 2, 2]
    assert not set(keep) & set(held) and len(keep) + len(held) == 40
    assert np.array_equal(held, stratified_split(labels, 0.2, seed=1)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=2)[1])


def test_imagefolder_with_held_out_fraction(tmp_path, make_cfg):
    write_png_tree(tmp_path)
    cfg = make_cfg("data=imagefolder", f"data.path={tmp_path}", "data.image_size=8", "data.canvas_size=10",
                   "data.batch_size=4", "data.val_fraction=0.34", "data.num_workers=0")
    dm = SSLDataModule(cfg.data)
    dm.setup()
    assert dm.class_names == ["cat", "dog"] and len(dm.val_set) == 4 and len(dm.pretrain_set) == 8
    img, size, label, i = dm.pretrain_set[0]
    assert img.shape == (3, 10, 10) and img.dtype == torch.uint8 and label in (0, 1)
    assert size.tolist() == [7, 10, 14, 20]  # 20 x 14 PNG: long side shrunk to the 10 px canvas


def test_imagefolder_with_train_val_split_folders(tmp_path, make_cfg):
    write_png_tree(tmp_path / "train", per_class=3)
    write_png_tree(tmp_path / "val", per_class=2)
    cfg = make_cfg("data=imagefolder", f"data.path={tmp_path}", "data.batch_size=2", "data.num_workers=0")
    dm = SSLDataModule(cfg.data)
    dm.setup()
    assert len(dm.pretrain_set) == 6 and len(dm.val_set) == 4


def test_missing_or_empty_folder_fails_at_start_up_naming_the_path(tmp_path, make_cfg):
    cfg = make_cfg("data=imagefolder", f"data.path={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="missing' does not exist"):
        SSLDataModule(cfg.data).setup()
    (tmp_path / "empty" / "a").mkdir(parents=True)
    cfg = make_cfg("data=imagefolder", f"data.path={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="no images"):
        SSLDataModule(cfg.data).setup()


def test_batch_larger_than_dataset_is_refused(make_cfg):
    cfg = make_cfg("data=synthetic", "data.batch_size=5000")
    with pytest.raises(ConfigError, match="data.batch_size: 5000 is larger than the training set"):
        SSLDataModule(cfg.data).setup()


def test_load_image_keeps_the_aspect_ratio_on_the_canvas_and_records_the_size(tmp_path):
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, 20:] = 255  # the right third white
    Image.fromarray(arr).save(tmp_path / "x.png")
    out, size = load_image(tmp_path / "x.png", 15)
    assert out.shape == (3, 15, 15) and out.dtype == torch.uint8
    assert size.tolist() == [5, 15, 10, 30]  # (canvas h, w, original h, w): the whole image, halved
    assert out[:, :5, 11:].float().mean() > 240 and out[:, :5, :9].float().mean() < 10  # the sides are there
    assert torch.equal(out[:, 5:], out[:, 4:5].expand(3, 10, 15))  # padding repeats the last row
    small, size = load_image(tmp_path / "x.png", 64)  # never enlarged
    assert size.tolist() == [10, 30, 10, 30] and torch.equal(small[:, :10, :30], torch.from_numpy(arr).permute(2, 0, 1))


def test_canvas_smaller_than_the_views_or_a_bad_eval_crop_is_refused(make_cfg):
    cfg = make_cfg("data=synthetic", "data.image_size=16", "data.canvas_size=12")
    with pytest.raises(ConfigError, match="data.canvas_size: 12 is smaller than data.image_size 16"):
        SSLDataModule(cfg.data).setup()
    cfg = make_cfg("data=synthetic", "data.eval_crop_fraction=1.5")
    with pytest.raises(ConfigError, match=r"data.eval_crop_fraction: 1.5 is not in \(0, 1\]"):
        SSLDataModule(cfg.data).setup()
