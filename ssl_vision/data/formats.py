"""Data formats: where each ``data.name`` finds its images and labels on disk, and its splits.

Each builder returns ``(pretrain, probe_train, val, class_names)``; nothing is downloaded
(``data.path`` points at the user's copy):

- ``digits``: scikit-learn's 8x8 handwritten digits (shipped with it: the offline default).
- ``synthetic``: class-structured random images (tests and benchmarks).
- ``cifar10`` / ``cifar100``: the python-version batch files (``data_batch_1..5``/``test_batch``,
  ``train``/``test`` with fine labels), read with a restricted unpickler (numpy arrays and builtins
  only, so a crafted file cannot run code) and kept in memory.
- ``stl10``: the binary version (``train_X.bin``, ``train_y.bin``, ``test_*``, ``unlabeled_X.bin``),
  memory-mapped; pre-training sees train + unlabeled, the probes train / test.
- ``imagenet``, ``imagenette``, ``imagewoof``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.
- ``imagenet100``: the CMC / solo-learn 100-class list (``ssl_vision/resources``) selected from a
  full ImageNet tree.
- ``data.label_subset`` (``imagenet``, ``imagenet100``): SimCLR's published 1% / 10% lists of labelled
  ImageNet-1k training files (``ssl_vision/resources/imagenet_subsets``), see ``label_subset_indexes``.
- ``imagefolder``: one sub-folder per class, or (``data.labels=false``) any folder of images for
  pre-training only (no probes: ``num_classes`` is 0).
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from .datasets import ConcatImages, ImageFiles, TensorImages, one_line
from .decoding import resize_uint8

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indexes so that ``fraction`` of each class goes to the second part (at least one)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))



def list_images(folder) -> list[str]:
    """Image files (by suffix) anywhere under ``folder``, sorted; hidden files and folders are ignored
    (e.g. macOS ``._x.jpg``); symlinked folders are followed once."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.join(dirpath, f) for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(out)


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def class_folder_samples(root: Path, classes=None) -> tuple[list[str], list[int], list[str]]:
    """A class-per-folder tree: ``root/<class>/**/<image>`` (only ``classes`` if given)."""
    classes = _class_dirs(root) if classes is None else list(classes)
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = list_images(root / name)
        paths += files
        labels += [c] * len(files)
    return paths, labels, classes


def _check_folder(root: Path, what: str) -> None:
    if not root.exists():
        raise ConfigError(f"data.path: '{root}' does not exist; expected {what}")
    if not root.is_dir():
        raise ConfigError(f"data.path: '{root}' is not a folder; expected {what}")


def _root(cfg, what: str) -> Path:
    if not cfg.get("path"):
        raise ConfigError(f"data.path: not set; data={cfg.name} needs data.path=<{what}>")
    root = Path(str(cfg.path)).expanduser()
    _check_folder(root, what)
    return root


# --- restricted unpickling (CIFAR) ----------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR python batches contain: builtins (dict, list, bytes, int, ...) and
    numpy uint8 arrays. Any other global - ``os.system``, ``builtins.eval``, a class - is refused
    before it can be called."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"it references {module}.{name}, which a CIFAR batch never contains")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core"):]
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise _Refused("it uses persistent ids, which a CIFAR batch never contains")


def safe_unpickle(path):
    """Load a CIFAR-style pickle with ``_CifarUnpickler``; any problem is a one-line ``ConfigError``."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise ConfigError(f"data.path: refusing to load '{path}': {e} (nothing in it was run)") from None
    except Exception as e:
        raise ConfigError(f"data.path: '{path}' is not a readable CIFAR pickle ({one_line(e)})") from None


# --- dataset builders: each returns (pretrain, probe_train, val, class_names) ---------------------


def _digits(cfg):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    images = resize_uint8(images, cfg.canvas_size)
    labels = torch.from_numpy(d.target)
    train_idx, val_idx = stratified_split(d.target, cfg.val_fraction, cfg.seed)
    train = TensorImages(images[train_idx], labels[train_idx])
    val = TensorImages(images[val_idx], labels[val_idx])
    return train, train, val, [str(i) for i in range(10)]


def synthetic_images(n: int, num_classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-structured random images: each class is a smooth colour pattern, each sample a shifted,
    noisy copy of it. Learnable, but not trivially separable by mean colour alone."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, 3, 4, 4, generator=g)
    protos = torch.nn.functional.interpolate(protos, size=(size, size), mode="bicubic", align_corners=False)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    x = protos[labels]
    shifts = torch.randint(-size // 4, size // 4 + 1, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts)])
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.15 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def _synthetic(cfg):
    images, labels = synthetic_images(cfg.num_samples, cfg.num_classes, cfg.canvas_size, cfg.seed)
    train_idx, val_idx = stratified_split(labels.numpy(), cfg.val_fraction, cfg.seed)
    train = TensorImages(images[train_idx], labels[train_idx])
    val = TensorImages(images[val_idx], labels[val_idx])
    return train, train, val, [str(i) for i in range(cfg.num_classes)]


def _labelled_folder(cfg):
    what = "a folder with one sub-folder of images per class (optionally under train/ and val/)"
    if not cfg.path:
        raise ConfigError("data.path: not set; data=imagefolder needs data.path=/path/to/images")
    root = Path(str(cfg.path)).expanduser()
    _check_folder(root, what)
    split = (root / "train").is_dir() and (root / "val").is_dir()
    tr_paths, tr_labels, classes = class_folder_samples(root / "train" if split else root)
    if not tr_paths:
        hint = ("; for a folder of images without class sub-folders set data.labels=false"
                if list_images(root) else "")
        raise ConfigError(f"data.path: no images (.jpg/.png/...) found under '{root}'; expected {what}{hint}")
    if split:
        va_paths, va_labels, va_classes = class_folder_samples(root / "val")
        if va_classes != classes:
            raise ConfigError(f"data.path: class folders of '{root}/val' differ from '{root}/train'")
    else:
        tr_idx, va_idx = stratified_split(tr_labels, cfg.val_fraction, cfg.seed)
        va_paths, va_labels = [tr_paths[i] for i in va_idx], [tr_labels[i] for i in va_idx]
        tr_paths, tr_labels = [tr_paths[i] for i in tr_idx], [tr_labels[i] for i in tr_idx]
    train = ImageFiles(tr_paths, tr_labels, cfg.canvas_size)
    val = ImageFiles(va_paths, va_labels, cfg.canvas_size)
    return train, train, val, classes


def _unlabelled_folder(cfg):
    """``data.labels=false``: every image under ``data.path`` (flat or nested) pre-trains; no probes."""
    what = "a folder of images (flat or nested; data.labels=false)"
    root = _root(cfg, what)
    paths = list_images(root)
    if not paths:
        raise ConfigError(f"data.path: no images (.jpg/.png/...) found under '{root}'; expected {what}")
    return ImageFiles(paths, [-1] * len(paths), cfg.canvas_size), None, None, []


def _imagefolder(cfg):
    return _labelled_folder(cfg) if cfg.get("labels", True) else _unlabelled_folder(cfg)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR = {
    "cifar10": dict(title="CIFAR-10", folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], label_key="labels", meta="batches.meta", names_key="label_names",
                    num_classes=10),
    "cifar100": dict(title="CIFAR-100", folder="cifar-100-python", train=["train"], test=["test"],
                     label_key="fine_labels", meta="meta", names_key="fine_label_names", num_classes=100),
}


def _str_keys(d: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    d = _str_keys(d) if isinstance(d, dict) else {}
    if "data" not in d or label_key not in d:
        raise ConfigError(f"data.path: '{path}' is not a CIFAR batch; expected a dict with 'data' and '{label_key}'")
    data, labels = np.asarray(d["data"]), np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ConfigError(f"data.path: '{path}' is not a CIFAR batch; expected uint8 'data' (N, 3072) and N labels")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"data.path: '{path}' has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels  # rows: 1024 red, 1024 green, 1024 blue, each row-major


def _cifar(cfg, variant: str):
    spec = CIFAR[variant]
    files = spec["train"] + spec["test"]
    what = f"the {spec['title']} python version ({spec['folder']}/ with {', '.join(files)})"
    root = _root(cfg, what)
    if (root / spec["folder"]).is_dir():
        root = root / spec["folder"]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ConfigError(f"data.path: '{root}' has no {', '.join(missing)}; expected {what}")

    def read(names):
        parts = [_read_cifar_batch(root / n, spec["label_key"], spec["num_classes"]) for n in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        return TensorImages(resize_uint8(images, cfg.canvas_size), torch.from_numpy(np.concatenate([p[1] for p in parts])))

    train, test = read(spec["train"]), read(spec["test"])
    names = CIFAR10_CLASSES if variant == "cifar10" else [str(i) for i in range(spec["num_classes"])]
    if (root / spec["meta"]).is_file():
        meta = safe_unpickle(root / spec["meta"])
        meta = _str_keys(meta) if isinstance(meta, dict) else {}
        found = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(spec["names_key"], [])]
        names = found if len(found) == spec["num_classes"] else names
    return train, train, test, names


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")
_STL_BYTES = 3 * 96 * 96


def _stl_images(path: Path, canvas: int) -> torch.Tensor:
    size = path.stat().st_size
    if size == 0 or size % _STL_BYTES:
        raise ConfigError(f"data.path: '{path}' is {size} bytes, not a whole number of 3x96x96 STL-10 images")
    # memory-mapped (copy-on-write: never written back); each image is stored column-major per channel
    arr = np.memmap(path, dtype=np.uint8, mode="c", shape=(size // _STL_BYTES, 3, 96, 96))
    return resize_uint8(torch.from_numpy(arr).transpose(2, 3), canvas)


def _stl_labels(path: Path, n: int) -> torch.Tensor:
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    if len(y) != n or (n and (y.min() < 0 or y.max() > 9)):
        raise ConfigError(f"data.path: '{path}' should hold {n} labels in 1..10 (one byte each), got {len(y)} bytes")
    return torch.from_numpy(y)


def _stl10(cfg):
    what = f"the STL-10 binary version (stl10_binary/ with {', '.join(STL10_FILES)})"
    root = _root(cfg, what)
    if (root / "stl10_binary").is_dir():
        root = root / "stl10_binary"
    missing = [f for f in STL10_FILES if not (root / f).is_file()]
    if missing:
        raise ConfigError(f"data.path: '{root}' has no {', '.join(missing)}; expected {what}")
    c = cfg.canvas_size
    tr_x, te_x = _stl_images(root / "train_X.bin", c), _stl_images(root / "test_X.bin", c)
    train = TensorImages(tr_x, _stl_labels(root / "train_y.bin", len(tr_x)))
    test = TensorImages(te_x, _stl_labels(root / "test_y.bin", len(te_x)))
    unl_x = _stl_images(root / "unlabeled_X.bin", c)
    unlabeled = TensorImages(unl_x, torch.full((len(unl_x),), -1, dtype=torch.long))
    names = STL10_CLASSES
    if (root / "class_names.txt").is_file():
        found = [ln.strip() for ln in (root / "class_names.txt").read_text().splitlines() if ln.strip()]
        names = found if len(found) == 10 else names
    return ConcatImages(train, unlabeled), train, test, names


def imagenet100_classes() -> list[str]:
    """The 100 ImageNet classes (wnids) of CMC / solo-learn's ImageNet-100, as shipped in the package."""
    from importlib.resources import files

    text = files("ssl_vision.resources").joinpath("imagenet100_classes.txt").read_text()
    return [w.strip() for w in text.split() if w.strip()]


LABEL_SUBSETS = ("1percent", "10percent")
LABEL_SUBSET_DATA = ("imagenet", "imagenet100")


def imagenet_subset(name: str) -> list[str]:
    """The file names of SimCLR's semi-supervised ImageNet-1k subset ``name`` (``1percent``: 12,811 names,
    ``10percent``: 128,116), e.g. ``n01440764_10026.JPEG``. Shipped unmodified from google-research/simclr
    ``imagenet_subsets/`` (Apache-2.0; ``ssl_vision/resources/imagenet_subsets/NOTICE``)."""
    from importlib.resources import files

    text = files("ssl_vision.resources").joinpath("imagenet_subsets").joinpath(f"{name}.txt").read_text()
    return [w.strip() for w in text.split() if w.strip()]


def label_subset_indexes(dataset, class_names: list[str], names: list[str]) -> tuple[np.ndarray, list[str], int]:
    """The samples of ``dataset`` (``ImageFiles`` of ``train/<wnid>/...``) named in ``names``, as the references
    read the lists (a name ``<wnid>_<n>.JPEG`` is the file ``train/<wnid>/<wnid>_<n>.JPEG``: facebookresearch/swav
    eval_semisup.py, the SimCLR lists): (sorted indexes, listed names of the data's classes that the tree
    lacks, number of listed names of the data's classes). Names of other classes are not this data's."""
    classes = set(class_names)
    wanted = [n for n in names if n.split("_")[0] in classes]
    where = {(class_names[label], os.path.basename(os.fsdecode(path))): i
             for i, (label, path) in enumerate(zip(dataset.labels.tolist(), dataset.paths)) if label >= 0}
    found = [where.get((n.split("_")[0], n)) for n in wanted]
    missing = [n for n, i in zip(wanted, found) if i is None]
    return np.sort(np.array([i for i in found if i is not None], dtype=np.int64)), missing, len(wanted)


def _split_tree(cfg, title: str, classes=None):
    """``root/train/<wnid>/*`` and ``root/val/<wnid>/*`` (ImageNet, ImageNet-100, Imagenette, Imagewoof)."""
    what = f"the {title} folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
    root = _root(cfg, what)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"data.path: '{root}' has no {split}/ folder; expected {what}")
    if classes is None:
        classes = _class_dirs(root / "train")
    for split in ("train", "val"):
        present = set(_class_dirs(root / split))
        if split == "val" and not present and list_images(root / split):
            raise ConfigError(f"data.path: '{root / split}' holds images but no class folders; expected {what} "
                              "(sort the validation images into val/<wnid>/, e.g. with ImageNet's valprep.sh)")
        lost = [c for c in classes if c not in present]
        if lost:
            raise ConfigError(f"data.path: {len(lost)} of the {len(classes)} {title} classes are missing under "
                              f"'{root / split}' (e.g. {', '.join(lost[:3])}); expected {what}")
    tr_paths, tr_labels, _ = class_folder_samples(root / "train", classes)
    va_paths, va_labels, _ = class_folder_samples(root / "val", classes)
    for split, paths in (("train", tr_paths), ("val", va_paths)):
        if not paths:
            raise ConfigError(f"data.path: no images (.JPEG/.png/...) found under '{root / split}'; expected {what}")
    train = ImageFiles(tr_paths, tr_labels, cfg.canvas_size)
    return train, train, ImageFiles(va_paths, va_labels, cfg.canvas_size), list(classes)


BUILDERS = {
    "digits": _digits,
    "synthetic": _synthetic,
    "imagefolder": _imagefolder,
    "cifar10": lambda cfg: _cifar(cfg, "cifar10"),
    "cifar100": lambda cfg: _cifar(cfg, "cifar100"),
    "stl10": _stl10,
    "imagenet": lambda cfg: _split_tree(cfg, "ImageNet"),
    "imagenet100": lambda cfg: _split_tree(cfg, "ImageNet-100", imagenet100_classes()),
    "imagenette": lambda cfg: _split_tree(cfg, "Imagenette"),
    "imagewoof": lambda cfg: _split_tree(cfg, "Imagewoof"),
}
