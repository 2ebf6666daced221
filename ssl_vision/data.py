"""Datasets and the LightningDataModule.

CPU-side work is only: decode, resize to a fixed-size uint8 canvas, and hand over
``(images_uint8 (B, 3, C, C), labels, indexes)``. All random augmentation happens later, on the
device, in ``ssl_vision.augment``. Unlabelled samples carry label -1.

Formats (``data.name``; ``data.path`` points at the user's copy, nothing is downloaded):

- ``cifar10`` / ``cifar100``: the python-version batch files (``data_batch_1..5``/``test_batch``,
  ``train``/``test`` with fine labels), read with a restricted unpickler (numpy arrays and builtins
  only, so a crafted file cannot run code) and kept in memory.
- ``stl10``: the binary version (``train_X.bin``, ``train_y.bin``, ``test_*``, ``unlabeled_X.bin``),
  memory-mapped; pre-training sees train + unlabeled, the probes train / test.
- ``imagenet``, ``imagenette``, ``imagewoof``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.
- ``imagenet100``: the CMC / solo-learn 100-class list (``ssl_vision/resources``) selected from a
  full ImageNet tree.
- ``imagefolder``: one sub-folder per class, or (``data.labels=false``) any folder of images for
  pre-training only (no probes: ``num_classes`` is 0).

Image files are decoded at reduced size where the codec allows it (JPEG draft mode) and resized
straight to the canvas. A file that cannot be decoded never stops a run: ``ImageFiles`` returns no
image for it, the loaders' collate function drops it, one warning names it the first time, and
``SkippedFilesReport`` logs how many were skipped at the end of every epoch.

The training loader can resume part-way through an epoch: every checkpoint holds the datamodule's
``state_dict`` (epoch, shuffle seed, batches trained), and a resumed run replays the rest of that
epoch in the same order without reading the batches already trained on.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .config import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


# --- datasets ---------------------------------------------------------------------------------------


class TensorImages(Dataset):
    """In-memory uint8 images ``(N, 3, H, W)`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
        self.images, self.labels = images, torch.as_tensor(labels).long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i


class ImageFiles(Dataset):
    """Image files decoded on access to an RGB uint8 ``canvas x canvas`` tensor.

    A file that cannot be decoded yields ``(None, label, i)`` (dropped by ``SkipUnreadable``); the
    first failure logs one warning naming the file, later epochs skip it without retrying. Flags
    and the skip counter live in shared memory, created before the loader's workers start, so the
    count is the same whichever worker met the file.
    """

    def __init__(self, paths, labels, canvas: int):
        paths = [os.fsencode(str(p)) for p in paths]
        # bytes in one numpy array, not a list of Path objects: workers forked from this process do
        # not touch (and so copy) millions of Python objects' reference counts
        self.paths = np.array(paths) if paths else np.array([], dtype="S1")
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.canvas = int(canvas)
        self._bad = mp.RawArray("B", max(1, len(paths)))  # 1: known unreadable (already warned)
        self._skipped = mp.Value("q", 0)

    def __len__(self):
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def __getitem__(self, i):
        label = self.labels[i]
        if not self._bad[i]:
            try:
                return load_image(self.path(i), self.canvas), label, i
            except Exception as e:  # a bad file must never end the run
                self._bad[i] = 1
                path = self.path(i)
                reason = _one_line(e).replace(f" {path!r}", "").replace(path, "the file")  # name it once
                log.warning("skipping unreadable image '%s' (%s)", path, reason)
        with self._skipped.get_lock():
            self._skipped.value += 1
        return None, label, i

    def take_skipped(self) -> int:
        """Files skipped since the last call (all workers), and reset the count."""
        with self._skipped.get_lock():
            n, self._skipped.value = self._skipped.value, 0
        return int(n)


class ImageSubset(Dataset):
    """A view of ``base``: some of its samples (``indices``) and/or other labels (``labels``)."""

    def __init__(self, base, indices=None, labels=None):
        self.base = base
        self.indices = None if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        base_labels = base.labels if self.indices is None else base.labels[self.indices]
        self.labels = base_labels if labels is None else torch.as_tensor(labels, dtype=torch.long)
        assert len(self.labels) == len(self)

    def __len__(self):
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        image, _, _ = self.base[i if self.indices is None else int(self.indices[i])]
        return image, self.labels[i], i


class ConcatImages(Dataset):
    """Datasets one after the other, indexes running over the whole (STL-10 train + unlabeled)."""

    def __init__(self, *parts):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.labels = torch.cat([p.labels for p in parts])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        image, label, _ = self.parts[k][i - int(self.offsets[k])]
        return image, label, i


class SkipUnreadable:
    """``collate_fn`` that drops samples whose file could not be decoded (image ``None``).

    Evaluation loaders (``refill=False``) keep every readable sample exactly once, so a batch can be
    smaller than the batch size. The pre-training loader (``refill=True``) fills the gaps with
    repeats of the batch's readable samples, so every step keeps the configured batch size: the
    MoCo v2 queue advances by whole batches, and under DDP every rank gathers tensors of one shape.
    A batch is empty - ``(0, 3, C, C)`` - only when every file in it was unreadable.
    """

    def __init__(self, canvas: int, refill: bool = False):
        self.canvas = int(canvas)
        self.refill = bool(refill)

    def __call__(self, batch):
        good = [b for b in batch if b[0] is not None]
        if self.refill and good:
            good += [good[i % len(good)] for i in range(len(batch) - len(good))]
        if not good:
            c = self.canvas
            empty = torch.empty(0, dtype=torch.long)
            return torch.empty(0, 3, c, c, dtype=torch.uint8), empty, empty.clone()
        # stacked in numpy: torch.stack would run on intra-op threads, which thrash when the loader
        # runs in the training process (num_workers=0) on a busy machine
        images = torch.from_numpy(np.stack([b[0].numpy() for b in good]))
        labels = torch.tensor([int(b[1]) for b in good], dtype=torch.long)
        return images, labels, torch.tensor([int(b[2]) for b in good], dtype=torch.long)


def _file_datasets(dataset) -> list[ImageFiles]:
    if isinstance(dataset, ImageFiles):
        return [dataset]
    if isinstance(dataset, ImageSubset):
        return _file_datasets(dataset.base)
    if isinstance(dataset, ConcatImages):
        return [f for p in dataset.parts for f in _file_datasets(p)]
    return []


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 200 else text[:197] + "..."


# --- decoding ---------------------------------------------------------------------------------------


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


def load_image(path, canvas: int) -> torch.Tensor:
    """Decode an image to RGB uint8 ``(3, canvas, canvas)``: shorter side resized to ``canvas``,
    center square crop. JPEGs are decoded at a reduced scale (DCT scaling, ``draft``) when they
    are at least twice the canvas; the resize reads only the central square."""
    with Image.open(path) as img:
        img.draft("RGB", (canvas, canvas))  # JPEG only (no-op otherwise); keeps both sides >= canvas
        img = _to_8bit(img)
        w, h = img.size
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        img = img.resize((canvas, canvas), Image.BILINEAR, box=box, reducing_gap=3.0)
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    # HWC -> CHW in numpy: a torch copy here would start intra-op threads for every image, which
    # made the single-process loader (num_workers=0) 3x slower on a busy 2-core machine
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --- helpers ------------------------------------------------------------------------------------------


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


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize a uint8 batch (N, C, H, W) to ``size`` with antialiasing; grayscale becomes RGB.
    Works ``chunk`` images at a time, so a large dataset never exists in float32 all at once."""
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
        raise ConfigError(f"data.path: '{path}' is not a readable CIFAR pickle ({_one_line(e)})") from None


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


# --- mid-epoch resume ---------------------------------------------------------------------------------


def train_batches_done(trainer) -> int:
    """Training batches finished in the current epoch, 0 once the epoch is complete: where a checkpoint
    saved now stands inside its epoch (Lightning's own batch counter, the one its loop resumes from)."""
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    return 0 if done >= trainer.num_training_batches else done


class EpochPosition:
    """Shared by the training loader, its sampler and the datamodule: the current epoch's shuffle seed
    and, after a resume from a checkpoint taken part-way through epoch ``resume_epoch``, that epoch's
    seed and the number of its batches already trained on. Every iterator made while the trainer is in
    that epoch replays it (Lightning makes more than one before the first batch, and loader workers
    draw indexes as soon as an iterator exists)."""

    def __init__(self, current_epoch):
        self.current_epoch = current_epoch
        self.seed: int | None = None
        self.resume_epoch: int | None = None
        self.resume_seed: int | None = None
        self.resume_batches = 0

    def resuming(self) -> bool:
        # <=: Lightning makes the resumed epoch's iterator before it restores its loops (epoch 0 then)
        return self.resume_epoch is not None and self.current_epoch() <= self.resume_epoch


class RecordedSeedSampler(RandomSampler):
    """``RandomSampler`` that draws its per-epoch seed from the global RNG exactly as ``RandomSampler``
    does (same order as a plain shuffled loader) and records it, so a resumed run can replay the epoch.
    Under DDP Lightning replaces it with a ``DistributedSampler`` (order from seed + epoch)."""

    def __init__(self, data_source, position: EpochPosition):
        super().__init__(data_source)
        self.position = position

    def __iter__(self):
        if self.position.resuming() and self.position.resume_seed is not None:
            seed = self.position.resume_seed
        else:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.position.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        yield from super().__iter__()


class _SkipBatches:
    """The loader's batch sampler, starting after the batches a resumed epoch has already trained on
    (index lists only: the skipped images are never read)."""

    def __init__(self, batches, position: EpochPosition):
        self.batches, self.position = batches, position

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        skip = self.position.resume_batches if self.position.resuming() else 0
        yield from itertools.islice(iter(self.batches), skip, None)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose next epoch can start part-way (``position.resume_batches``)."""

    def __init__(self, *args, position: EpochPosition, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    @property
    def _index_sampler(self):
        return _SkipBatches(super()._index_sampler, self.position)


# --- the DataModule -------------------------------------------------------------------------------


class SSLDataModule(L.LightningDataModule):
    """Pre-training loader (shuffled, drop_last) plus labelled probe-train and validation sets.

    ``data.label_fraction`` (e.g. 0.01 or 0.1) keeps a stratified, seeded fraction of the labels for
    the probes (semi-supervised protocol); pre-training still sees every image, and the online probe
    only the kept labels. Unlabelled data (``data.labels=false``) has ``num_classes == 0`` and no
    validation loader.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.name not in BUILDERS:
            raise ConfigError(f"data.name: unknown dataset '{cfg.name}'; choose one of: {', '.join(BUILDERS)}")
        self.pretrain_set = self.probe_train_set = self.val_set = None
        self.class_names: list[str] = []
        self.position = EpochPosition(lambda: self.trainer.current_epoch if self.trainer is not None else 0)

    def setup(self, stage=None):
        if self.pretrain_set is not None:
            return
        self.pretrain_set, self.probe_train_set, self.val_set, self.class_names = BUILDERS[self.cfg.name](self.cfg)
        self._apply_label_fraction()
        n, bs = len(self.pretrain_set), self.cfg.batch_size
        if bs > n:
            raise ConfigError(
                f"data.batch_size: {bs} is larger than the training set ({n} images); use at most {n}"
            )

    def _apply_label_fraction(self) -> None:
        fraction = self.cfg.get("label_fraction")
        if fraction is None:
            return
        fraction = float(fraction)
        if not 0 < fraction <= 1:
            raise ConfigError(f"data.label_fraction: {fraction} is not in (0, 1]; e.g. 0.01 or 0.1 (null: all labels)")
        if self.num_classes == 0:
            raise ConfigError("data.label_fraction: the data has no labels (data.labels=false); leave it null")
        if fraction == 1:
            return
        labels = self.probe_train_set.labels.numpy()
        known = np.flatnonzero(labels >= 0)
        _, held = stratified_split(labels[known], fraction, int(self.cfg.seed))
        keep = known[held]
        probe = self.probe_train_set
        self.probe_train_set = ImageSubset(probe, keep)
        if self.pretrain_set is probe:  # the online probe sees only the kept labels too
            masked = torch.full_like(probe.labels, -1)
            masked[keep] = probe.labels[keep]
            self.pretrain_set = ImageSubset(probe, labels=masked)
        log.info("data.label_fraction=%g: the probes use %d of %d labelled images (stratified, seed %d)",
                 fraction, len(keep), len(known), int(self.cfg.seed))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _loader(self, dataset, shuffle: bool, drop_last: bool, batch_size=None, refill: bool = False,
                loader=DataLoader, **kwargs):
        workers = int(self.cfg.num_workers)
        # persistent workers take their base seed once, at the first iterator; from a private generator,
        # that draw stays off the global random stream, which a resumed run then continues exactly
        generator = torch.Generator().manual_seed(int(self.cfg.seed)) if workers > 0 else None
        return loader(
            dataset,
            batch_size=batch_size or self.cfg.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=SkipUnreadable(self.cfg.canvas_size, refill),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            generator=generator,
            **kwargs,
        )

    def train_dataloader(self):
        """Shuffled, drop_last; resumable mid-epoch (``ResumableLoader``)."""
        return self._loader(self.pretrain_set, shuffle=False, drop_last=True, refill=True, loader=ResumableLoader,
                            sampler=RecordedSeedSampler(self.pretrain_set, self.position), position=self.position)

    # --- where training stands in its epoch: saved in every checkpoint -----------------------------------
    # Lightning restores a datamodule's state before it builds the first training iterator (it builds
    # one early, for ``estimated_stepping_batches``), which a loader's own state_dict would miss.
    def state_dict(self):
        if self.trainer is None:
            return {}
        done = train_batches_done(self.trainer)
        return {"train_epoch": int(self.trainer.current_epoch), "train_batches_done": done,
                "train_seed": self.position.seed if done else None}

    def load_state_dict(self, state):
        """A checkpoint taken part-way through an epoch: that epoch is replayed in the same order (same
        seed; under DDP, same seed + epoch) from the first batch not yet trained on."""
        done = int(state.get("train_batches_done", 0))
        self.position.resume_epoch = int(state["train_epoch"]) if done else None
        self.position.resume_batches = done
        self.position.resume_seed = state.get("train_seed")

    def val_dataloader(self):
        if self.val_set is None:  # unlabelled data: nothing to validate the online probe on
            return []
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def probe_dataloaders(self, batch_size=None):
        """(probe-train, validation) loaders in a fixed order, for offline evaluation."""
        if self.probe_train_set is None or self.val_set is None:
            raise ConfigError(f"data: '{self.cfg.name}' has no labels (data.labels=false), so there is nothing to probe")
        return (
            self._loader(self.probe_train_set, shuffle=False, drop_last=False, batch_size=batch_size),
            self._loader(self.val_set, shuffle=False, drop_last=False, batch_size=batch_size),
        )

    # --- unreadable files -------------------------------------------------------------------------
    def take_skipped(self) -> int:
        """Unreadable files skipped (over all sets and workers of this process) since the last call."""
        sets = [self.pretrain_set, self.probe_train_set, self.val_set]
        files = {id(f): f for s in sets if s is not None for f in _file_datasets(s)}
        return sum(f.take_skipped() for f in files.values())

    def report_skipped(self, when: str = "this epoch") -> int:
        """Log ``skipped N unreadable files <when>`` if any were skipped since the last call."""
        n = self.take_skipped()
        if n:
            log.warning("skipped %d unreadable files %s", n, when)
        return n


class SkippedFilesReport(L.Callback):
    """Logs ``skipped N unreadable files this epoch`` (summed over ranks and workers) after every
    training epoch, validation included. Add it to the Trainer: ``callbacks=[SkippedFilesReport()]``;
    it reads ``trainer.datamodule`` (an ``SSLDataModule``) and does nothing otherwise."""

    @staticmethod
    def _count(trainer, pl_module) -> int:
        dm = getattr(trainer, "datamodule", None)
        n = dm.take_skipped() if isinstance(dm, SSLDataModule) else 0
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(torch.tensor(float(n), device=pl_module.device), reduce_op="sum")
            n = int(round(float(total)))
        return n

    def _report(self, trainer, pl_module, when: str) -> None:
        n = self._count(trainer, pl_module)
        if n and trainer.is_global_zero:
            log.warning("skipped %d unreadable files %s", n, when)

    def on_train_start(self, trainer, pl_module):
        self._report(trainer, pl_module, "before training")  # e.g. a random-init baseline probe

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, f"this epoch (epoch {trainer.current_epoch})")
