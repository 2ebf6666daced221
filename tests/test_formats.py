"""Each on-disk format, written small by the tests themselves, loads with the right shapes, labels
and counts; a crafted CIFAR pickle runs nothing; bad paths fail at start-up in one line."""

import builtins
import logging
import os
import pickle
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vision.config import ConfigError
from ssl_vision.data import SSLDataModule, imagenet100_classes

SMALL = ("data.image_size=16", "data.canvas_size=20", "data.batch_size=2", "data.num_workers=0")
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def data_module(make_cfg, *overrides):
    dm = SSLDataModule(make_cfg(*overrides).data)
    dm.setup()
    return dm


def one_line_error(make_cfg, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        data_module(make_cfg, *overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- CIFAR ------------------------------------------------------------------------------------------


def cifar_images(n, seed):
    """(n, 3072) uint8 rows as in the real files; image k has red = k, green = 100 + k, blue = 200."""
    rows = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for k in range(n):
        rows[k, 0], rows[k, 1], rows[k, 2] = k, 100 + k, 200
    rows[:, 0, 0, 31] = 255  # top-right corner of the red plane: checks the row-major layout
    return rows.reshape(n, 3072)


def write_cifar10(root, per_batch=4, test=5):
    root.mkdir(parents=True, exist_ok=True)
    for b in range(1, 6):
        labels = [(b + i) % 10 for i in range(per_batch)]
        batch = {b"batch_label": b"training batch %d of 5" % b, b"labels": labels,
                 b"data": cifar_images(per_batch, b), b"filenames": [b"x.png"] * per_batch}
        (root / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=2))
    (root / "test_batch").write_bytes(pickle.dumps(
        {b"batch_label": b"testing batch 1 of 1", b"labels": list(range(test)), b"data": cifar_images(test, 0),
         b"filenames": [b"y.png"] * test}, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))


def test_cifar10_python_batches(tmp_path, make_cfg):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    # data.path may name the extracted folder or the folder that holds it
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        dm = data_module(make_cfg, "data=cifar10", f"data.path={path}", "data.batch_size=4")
        assert len(dm.pretrain_set) == 20 and dm.probe_train_set is dm.pretrain_set and len(dm.val_set) == 5
        assert dm.num_classes == 10 and dm.class_names[1] == "automobile"
    assert dm.pretrain_set.labels.tolist()[:4] == [1, 2, 3, 4] and dm.val_set.labels.tolist() == [0, 1, 2, 3, 4]
    img, size, label, _ = dm.pretrain_set[2]
    assert size.tolist() == [32, 32, 32, 32]  # in memory: the image fills its canvas
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 3
    assert img[:, 5, 5].tolist() == [2, 102, 200] and img[0, 0, 31] == 255 and img[0, 31, 0] == 2
    images, _, labels, idx = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long and idx.shape == (4,)


def test_cifar10_resized_to_another_canvas(tmp_path, make_cfg):
    write_cifar10(tmp_path)
    dm = data_module(make_cfg, "data=cifar10", f"data.path={tmp_path}", "data.image_size=16", "data.canvas_size=16",
                     "data.batch_size=4")
    assert dm.pretrain_set.images.shape == (20, 3, 16, 16)


def test_cifar100_uses_the_fine_labels(tmp_path, make_cfg):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        batch = {b"filenames": [b"a.png"] * n, b"batch_label": b"x", b"fine_labels": [99 - i for i in range(n)],
                 b"coarse_labels": [i % 20 for i in range(n)], b"data": cifar_images(n, 0)}
        (root / split).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"class{i}".encode() for i in range(100)]
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": names[:20]}))
    dm = data_module(make_cfg, "data=cifar100", f"data.path={tmp_path}", "data.batch_size=4")
    assert dm.num_classes == 100 and dm.class_names[99] == "class99"
    assert len(dm.pretrain_set) == 6 and len(dm.val_set) == 3
    assert dm.pretrain_set.labels.tolist() == [99, 98, 97, 96, 95, 94] and dm.val_set.labels.tolist() == [99, 98, 97]
    assert dm.pretrain_set[0][0].shape == (3, 32, 32)


class _RunsCode:
    """A pickle payload that, unpickled without restriction, runs ``code`` through ``builtins.exec``."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return builtins.exec, (self.code,)


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("payload", ["exec", "os.system"])
def test_crafted_cifar_pickle_is_refused_without_running_anything(tmp_path, make_cfg, payload):
    write_cifar10(tmp_path / "cifar")
    marker = tmp_path / "pwned"

    def crafted(target):
        evil = (_RunsCode(f"open({str(target)!r}, 'w').write('x')") if payload == "exec"
                else _RunsShell(f"touch '{target}'"))
        return pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2)

    # the payload is live: a plain pickle.loads runs it
    control = tmp_path / "control"
    pickle.loads(crafted(control))
    assert control.exists()

    (tmp_path / "cifar" / "data_batch_3").write_bytes(crafted(marker))
    msg = one_line_error(make_cfg, "data=cifar10", f"data.path={tmp_path / 'cifar'}")
    assert "refusing to load" in msg and "data_batch_3" in msg
    assert (".exec" if payload == "exec" else ".system") in msg  # __builtin__.exec / posix.system
    assert not marker.exists()


def test_cifar_folder_without_its_batches_names_what_is_missing(tmp_path, make_cfg):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_2").unlink()
    (tmp_path / "test_batch").unlink()
    msg = one_line_error(make_cfg, "data=cifar10", f"data.path={tmp_path}")
    assert f"'{tmp_path}' has no data_batch_2, test_batch" in msg and "CIFAR-10 python version" in msg
    msg = one_line_error(make_cfg, "data=cifar100", f"data.path={tmp_path}")
    assert "has no train, test" in msg
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle")
    (tmp_path / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    msg = one_line_error(make_cfg, "data=cifar10", f"data.path={tmp_path}")
    assert "data_batch_2' is not a readable CIFAR pickle" in msg


# --- STL-10 -----------------------------------------------------------------------------------------


def stl_images(n):
    """(n, 3, 96, 96) images: red grows with x (column), green with y (row), blue = image number."""
    x = np.zeros((n, 3, 96, 96), dtype=np.uint8)
    x[:, 0] = np.arange(96, dtype=np.uint8)[None, None, :]
    x[:, 1] = np.arange(96, dtype=np.uint8)[None, :, None]
    x[:, 2] = np.arange(n, dtype=np.uint8)[:, None, None]
    return x


def write_stl(root, n_train=6, n_test=4, n_unlabeled=5):
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        # the binary files store every channel column-major (as MATLAB wrote them)
        (root / f"{name}_X.bin").write_bytes(stl_images(n).transpose(0, 1, 3, 2).tobytes())
        (root / f"{name}_y.bin").write_bytes(bytes((i % 10) + 1 for i in range(n)))
    (root / "unlabeled_X.bin").write_bytes(stl_images(n_unlabeled).transpose(0, 1, 3, 2).tobytes())


def test_stl10_binaries(tmp_path, make_cfg):
    write_stl(tmp_path / "stl10_binary")
    dm = data_module(make_cfg, "data=stl10", f"data.path={tmp_path}", "data.batch_size=4", "data.num_workers=0")
    assert dm.num_classes == 10 and dm.class_names[0] == "airplane"
    assert len(dm.pretrain_set) == 6 + 5 and len(dm.probe_train_set) == 6 and len(dm.val_set) == 4
    assert dm.probe_train_set.labels.tolist() == [0, 1, 2, 3, 4, 5] and dm.val_set.labels.tolist() == [0, 1, 2, 3]
    assert dm.pretrain_set.labels.tolist() == [0, 1, 2, 3, 4, 5] + [-1] * 5
    img, _, label, idx = dm.pretrain_set[8]  # the third unlabeled image
    assert img.shape == (3, 96, 96) and img.dtype == torch.uint8 and label == -1 and idx == 8
    assert img[0, 10, 40] == 40 and img[1, 10, 40] == 10 and img[2, 0, 0] == 2  # not transposed
    images, _, labels, idx = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 96, 96) and len(set(idx.tolist())) == 4


def test_stl10_resized_to_a_smaller_canvas(tmp_path, make_cfg):
    write_stl(tmp_path)
    dm = data_module(make_cfg, "data=stl10", f"data.path={tmp_path}", "data.image_size=32", "data.canvas_size=48",
                     "data.batch_size=2")
    img = dm.val_set[1][0]
    assert img.shape == (3, 48, 48) and img[2].float().mean() == 1


def test_stl10_missing_or_malformed_files_fail_at_start_up(tmp_path, make_cfg):
    write_stl(tmp_path)
    (tmp_path / "unlabeled_X.bin").unlink()
    msg = one_line_error(make_cfg, "data=stl10", f"data.path={tmp_path}")
    assert f"'{tmp_path}' has no unlabeled_X.bin" in msg and "STL-10 binary version" in msg
    (tmp_path / "unlabeled_X.bin").write_bytes(b"\0" * 1000)
    msg = one_line_error(make_cfg, "data=stl10", f"data.path={tmp_path}")
    assert "unlabeled_X.bin' is 1000 bytes, not a whole number of 3x96x96" in msg


# --- ImageNet-style trees ---------------------------------------------------------------------------


def write_tree(root, wnids, per_class=2, size=(24, 18), fmt="JPEG"):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for w in wnids:
            (root / split / w).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / w / f"{w}_{i}.{fmt}", format="JPEG")


@pytest.mark.parametrize("name", ["imagenet", "imagenette", "imagewoof"])
def test_train_val_class_trees(tmp_path, make_cfg, name):
    wnids = ["n01440764", "n02102040", "n02979186"]
    write_tree(tmp_path, wnids, per_class=3)
    dm = data_module(make_cfg, f"data={name}", f"data.path={tmp_path}", *SMALL)
    assert dm.class_names == wnids and dm.num_classes == 3
    assert len(dm.pretrain_set) == 9 and len(dm.val_set) == 3
    assert dm.pretrain_set.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and dm.val_set.labels.tolist() == [0, 1, 2]
    images, sizes, labels, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 20, 20) and images.dtype == torch.uint8
    assert sizes.tolist() == [[15, 20, 18, 24]] * 2  # 24 x 18 JPEGs, long side to the 20 px canvas


def test_imagenet_val_must_be_sorted_into_class_folders(tmp_path, make_cfg):
    write_tree(tmp_path, ["n01440764", "n02102040"])
    for f in (tmp_path / "val").rglob("*.JPEG"):
        f.rename(tmp_path / "val" / f.name)
    for d in (tmp_path / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    msg = one_line_error(make_cfg, "data=imagenet", f"data.path={tmp_path}", *SMALL)
    assert f"'{tmp_path / 'val'}' holds images but no class folders" in msg
    (tmp_path / "val").rename(tmp_path / "validation")
    msg = one_line_error(make_cfg, "data=imagenet", f"data.path={tmp_path}", *SMALL)
    assert f"'{tmp_path}' has no val/ folder" in msg


def test_imagenet100_selects_its_classes_from_a_full_tree(tmp_path, make_cfg):
    classes = imagenet100_classes()
    assert len(classes) == 100 == len(set(classes)) and all(c.startswith("n") for c in classes)
    others = ["n00000001", "n99999999"]  # not in the subset: ignored
    write_tree(tmp_path / "imagenet", classes + others, per_class=1, size=(8, 8))
    dm = data_module(make_cfg, "data=imagenet100", f"data.path={tmp_path / 'imagenet'}", *SMALL)
    assert dm.num_classes == 100 and sorted(dm.class_names) == sorted(classes)
    assert len(dm.pretrain_set) == 100 and len(dm.val_set) == 100
    assert not any(o in dm.pretrain_set.path(i) for o in others for i in range(100))
    for ds in (dm.pretrain_set, dm.val_set):  # every sample's label is its folder's class
        assert all(Path(ds.path(i)).parent.name == dm.class_names[int(ds.labels[i])] for i in range(100))

    # the symlink tree of tools/make_imagenet100.py loads the same classes, by data=imagenet100 or imagefolder
    tool = runpy.run_path(str(TOOLS / "make_imagenet100.py"))
    out = tmp_path / "imagenet100"
    assert tool["make_imagenet100"](tmp_path / "imagenet", out) == 200
    assert tool["make_imagenet100"](tmp_path / "imagenet", out) == 0  # idempotent
    assert (out / "train" / classes[0]).is_symlink() and len(list((out / "val").iterdir())) == 100
    linked = data_module(make_cfg, "data=imagenet100", f"data.path={out}", *SMALL)
    assert linked.class_names == dm.class_names and len(linked.pretrain_set) == 100
    folder = data_module(make_cfg, "data=imagefolder", f"data.path={out}", *SMALL)
    assert sorted(folder.class_names) == sorted(classes) and len(folder.val_set) == 100

    # a tree without some of the 100 classes is refused, naming them
    for split in ("train", "val"):
        for w in classes[:2]:
            for f in (tmp_path / "imagenet" / split / w).iterdir():
                f.unlink()
            (tmp_path / "imagenet" / split / w).rmdir()
    msg = one_line_error(make_cfg, "data=imagenet100", f"data.path={tmp_path / 'imagenet'}", *SMALL)
    assert "2 of the 100 ImageNet-100 classes are missing" in msg and classes[0] in msg
    with pytest.raises(SystemExit, match="2 of the 100 ImageNet-100 classes are missing"):
        tool["make_imagenet100"](tmp_path / "imagenet", tmp_path / "other")


# --- unlabelled folders, label fraction, start-up failures -------------------------------------------


def test_unlabelled_folder_flat_and_nested_pretrains_without_probes(tmp_path, make_cfg):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, sub in enumerate(["", "a", "a/b", "", "a"]):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._0.png").write_bytes(b"macOS resource fork")  # hidden: ignored
    dm = data_module(make_cfg, "data=imagefolder", f"data.path={tmp_path}", "data.labels=false", *SMALL)
    assert dm.num_classes == 0 and dm.class_names == [] and len(dm.pretrain_set) == 5
    assert dm.pretrain_set.labels.tolist() == [-1] * 5 and dm.val_set is None
    assert dm.val_dataloader() == []
    images, _, labels, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 20, 20) and labels.tolist() == [-1, -1]
    with pytest.raises(ConfigError, match="has no labels"):
        dm.probe_dataloaders()
    # the same flat folder with labels=true explains what to do
    msg = one_line_error(make_cfg, "data=imagefolder", f"data.path={tmp_path / 'a' / 'b'}", *SMALL)
    assert "no images" in msg and "set data.labels=false" in msg


def test_label_fraction_is_a_stratified_seeded_subset_of_the_probe_train_set(tmp_path, make_cfg):
    base = ("data=synthetic", "data.num_samples=400", "data.num_classes=4", "data.val_fraction=0.25")
    full = data_module(make_cfg, *base)
    dm = data_module(make_cfg, *base, "data.label_fraction=0.1")
    # 75 training images per class: round(7.5) = 8 of each class keep their label
    assert len(full.probe_train_set) == 300 and len(dm.probe_train_set) == 32
    assert np.bincount(dm.probe_train_set.labels.numpy()).tolist() == [8, 8, 8, 8]
    # pre-training still sees every image; the online probe only the kept labels
    assert len(dm.pretrain_set) == 300 and int((dm.pretrain_set.labels >= 0).sum()) == 32
    assert len(dm.val_set) == 100
    # each kept sample is the same image with the same label as in the full set
    for i in range(0, 32, 7):
        img, _, label, _ = dm.probe_train_set[i]
        j = int(dm.probe_train_set.indices[i])
        assert torch.equal(img, full.probe_train_set[j][0]) and label == full.probe_train_set.labels[j]
    again = data_module(make_cfg, *base, "data.label_fraction=0.1")
    other = data_module(make_cfg, *base, "data.label_fraction=0.1", "seed=1")
    assert torch.equal(again.probe_train_set.indices, dm.probe_train_set.indices)
    assert not torch.equal(other.probe_train_set.indices, dm.probe_train_set.indices)
    for bad in ("0", "1.5"):
        assert "data.label_fraction" in one_line_error(make_cfg, *base, f"data.label_fraction={bad}")


def test_label_fraction_on_image_files(tmp_path, make_cfg):
    write_tree(tmp_path, ["n01", "n02"], per_class=10, size=(8, 8))
    dm = data_module(make_cfg, "data=imagenette", f"data.path={tmp_path}", "data.label_fraction=0.2", *SMALL)
    assert dm.probe_train_set.labels.tolist() == [0, 0, 1, 1] and len(dm.pretrain_set) == 20
    images, _, labels, _ = next(iter(dm.probe_dataloaders(batch_size=4)[0]))
    assert images.shape == (4, 3, 20, 20) and labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "imagenette",
                                  "imagewoof", "imagefolder"])
def test_bad_paths_fail_at_start_up_in_one_line(tmp_path, make_cfg, name):
    missing = tmp_path / "missing"
    msg = one_line_error(make_cfg, f"data={name}", f"data.path={missing}")
    assert msg.startswith(f"data.path: '{missing}' does not exist; expected ")
    (tmp_path / "file.txt").write_text("x")
    msg = one_line_error(make_cfg, f"data={name}", f"data.path={tmp_path / 'file.txt'}")
    assert f"'{tmp_path / 'file.txt'}' is not a folder; expected" in msg
    (tmp_path / "empty").mkdir()
    msg = one_line_error(make_cfg, f"data={name}", f"data.path={tmp_path / 'empty'}")
    assert str(tmp_path / "empty") in msg and "expected" in msg
    assert "not set" in one_line_error(make_cfg, f"data={name}")


def test_folder_without_images_fails_naming_it(tmp_path, make_cfg):
    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        (tmp_path / split / "n01" / "readme.txt").write_text("x")
    msg = one_line_error(make_cfg, "data=imagenet", f"data.path={tmp_path}")
    assert f"no images (.JPEG/.png/...) found under '{tmp_path / 'train'}'" in msg
    msg = one_line_error(make_cfg, "data=imagefolder", f"data.path={tmp_path}", "data.labels=false")
    assert f"no images (.jpg/.png/...) found under '{tmp_path}'" in msg


def test_unlabelled_folder_pre_trains_and_skips_the_probes_with_a_message(tmp_path, make_cfg, caplog,
                                                                             monkeypatch):
    from ssl_vision.train import run

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "deep").mkdir(parents=True)
    for i in range(8):
        sub = tmp_path / "imgs" / ("deep" if i % 2 else "")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(sub / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("data=imagefolder", f"data.path={tmp_path / 'imgs'}", "data.labels=false", "backbone=resnet18_tiny",
                   *SMALL[:2], "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
                   "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "+run_dir=run")
    caplog.set_level(logging.INFO)
    summary = run(cfg)
    assert summary["steps"] == 2 and "linear_probe_top1" not in summary
    assert (tmp_path / "run" / "summary.json").is_file()
    assert any("no labels" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


# --- SimCLR's semi-supervised subsets (data.label_subset) -----------------------------------------------------


def test_shipped_subset_lists_hold_the_published_names():
    from ssl_vision.data.formats import imagenet_subset

    one, ten = imagenet_subset("1percent"), imagenet_subset("10percent")
    assert len(one) == len(set(one)) == 12_811 and len(ten) == len(set(ten)) == 128_116
    assert set(one) <= set(ten)  # the 1% images are among the 10%
    for names in (one, ten):
        assert len({n.split("_")[0] for n in names}) == 1000 and all(n.endswith(".JPEG") for n in names)
    classes = set(imagenet100_classes())  # data=imagenet100: the lists restricted to its classes, ~1% / 10%
    assert sum(n.split("_")[0] in classes for n in one) == 1278 and sum(n.split("_")[0] in classes for n in ten) == 12_812
    root = Path(__file__).resolve().parent.parent / "ssl_vision" / "resources" / "imagenet_subsets"
    notice = (root / "NOTICE").read_text()
    assert "google-research/simclr" in notice and "Apache License, Version 2.0" in notice
    assert "Apache License" in (root / "LICENSE").read_text()


def write_subset_tree(root, wnids, unlisted=2):
    """train/<wnid>/ with every file the 1% list names for ``wnid`` plus ``unlisted`` files it does not name;
    val/<wnid>/ with one image. Returns (listed names, unlisted names)."""
    from ssl_vision.data.formats import imagenet_subset

    listed = [n for n in imagenet_subset("1percent") if n.split("_")[0] in wnids]
    ten = set(imagenet_subset("10percent"))
    others = []
    for w in wnids:
        k = 900000
        while len([o for o in others if o.startswith(w)]) < unlisted:
            name = f"{w}_{k}.JPEG"
            if name not in ten:
                others.append(name)
            k += 1
    pixels = np.full((8, 8, 3), 128, dtype=np.uint8)
    for name in listed + others:
        (root / "train" / name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "train" / name.split("_")[0] / name, format="JPEG")
    for w in wnids:
        (root / "val" / w).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "val" / w / f"ILSVRC2012_val_{w}.JPEG", format="JPEG")
    return listed, others


def test_label_subset_selects_exactly_the_listed_files(tmp_path, make_cfg):
    wnids = ["n01440764", "n01443537", "n02102040"]
    listed, unlisted = write_subset_tree(tmp_path, wnids)
    assert len(listed) == 13 + 12 + 13 and len(unlisted) == 6
    dm = data_module(make_cfg, "data=imagenet", f"data.path={tmp_path}", "data.label_subset=1percent", *SMALL)
    probe = dm.probe_train_set
    names = sorted(Path(probe.base.path(int(i))).name for i in probe.indices)
    assert names == sorted(listed)  # every listed file, no unlisted one
    assert all(wnids[int(probe.labels[j])] == Path(probe.base.path(int(probe.indices[j]))).parent.name
               for j in range(len(probe)))
    # pre-training sees every image; only the listed ones keep their label (the online probe's)
    assert len(dm.pretrain_set) == len(listed) + len(unlisted)
    kept = {Path(dm.pretrain_set.base.path(i)).name for i in range(len(dm.pretrain_set)) if dm.pretrain_set.labels[i] >= 0}
    assert kept == set(listed)
    images, _, labels, _ = next(iter(dm.probe_dataloaders(batch_size=4)[0]))
    assert images.shape == (4, 3, 20, 20) and (labels >= 0).all()

    # the 10% list names files this tree lacks: one line with how many
    msg = one_line_error(make_cfg, "data=imagenet", f"data.path={tmp_path}", "data.label_subset=10percent", *SMALL)
    from ssl_vision.data.formats import imagenet_subset

    ten = [n for n in imagenet_subset("10percent") if n.split("_")[0] in wnids]
    assert msg.startswith(f"data.label_subset: {len(ten) - len(listed)} of the {len(ten)} files listed in 10percent "
                          f"for the 3 classes under '{tmp_path}/train' are missing")
    (tmp_path / "train" / listed[0].split("_")[0] / listed[0]).unlink()
    msg = one_line_error(make_cfg, "data=imagenet", f"data.path={tmp_path}", "data.label_subset=1percent", *SMALL)
    assert "1 of the 38 files listed in 1percent" in msg and f"(e.g. {listed[0]} in {listed[0].split('_')[0]}/)" in msg


def test_label_subset_settings_fail_in_one_line(tmp_path, make_cfg):
    write_subset_tree(tmp_path, ["n01440764"])
    base = ("data=imagenet", f"data.path={tmp_path}", *SMALL)
    assert "unknown subset '5percent'; choose one of: 1percent, 10percent" in \
        one_line_error(make_cfg, *base, "data.label_subset=5percent")
    assert "set together with data.label_fraction=0.1; use one" in \
        one_line_error(make_cfg, *base, "data.label_subset=1percent", "data.label_fraction=0.1")
    msg = one_line_error(make_cfg, "data=synthetic", "+data.label_subset=1percent")
    assert "for data=imagenet or imagenet100, not 'synthetic'; use data.label_fraction instead" in msg
    (tmp_path / "other" / "train" / "cats").mkdir(parents=True)
    (tmp_path / "other" / "val" / "cats").mkdir(parents=True)
    for split in ("train", "val"):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "other" / split / "cats" / "a.jpg")
    msg = one_line_error(make_cfg, "data=imagenet", f"data.path={tmp_path / 'other'}", "data.label_subset=1percent",
                         *SMALL)
    assert "none of the files listed in 1percent belongs to the 1 classes" in msg
