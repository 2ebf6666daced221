"""Datasets and the LightningDataModule.

CPU-side work is only: decode, resize to a fixed-size uint8 canvas, and hand over
``(images_uint8 (B, 3, C, C), labels, indexes)``. All random augmentation happens later, on the
device, in ``ssl_vision.augment``. Unlabelled samples carry label -1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class TensorImages(Dataset):
    """In-memory uint8 images ``(N, 3, H, W)`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
        self.images, self.labels = images, labels.long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i


class ImageFiles(Dataset):
    """Image files decoded on access to an RGB uint8 ``canvas x canvas`` tensor."""

    def __init__(self, paths: list[Path], labels: list[int], canvas: int):
        self.paths, self.labels, self.canvas = list(paths), torch.tensor(labels, dtype=torch.long), canvas

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.canvas), self.labels[i], i


def load_image(path, canvas: int) -> torch.Tensor:
    """Decode an image to RGB, resize its shorter side to ``canvas`` and center-crop a square."""
    with Image.open(path) as img:
        img.draft("RGB", (canvas, canvas))  # JPEG: decode at reduced size when much larger
        img = img.convert("RGB")
        w, h = img.size
        scale = canvas / min(w, h)
        nw, nh = max(canvas, round(w * scale)), max(canvas, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        left, top = (nw - canvas) // 2, (nh - canvas) // 2
        img = img.crop((left, top, left + canvas, top + canvas))
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch (N, C, H, W) to ``size`` with antialiasing; grayscale becomes RGB."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp_(0, 255).to(torch.uint8).contiguous()


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


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_folder_samples(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """A class-per-folder tree: ``root/<class>/**/<image>``."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
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


def _imagefolder(cfg):
    if not cfg.path:
        raise ConfigError("data.path: not set; data=imagefolder needs data.path=/path/to/images")
    root = Path(str(cfg.path)).expanduser()
    what = "a folder with one sub-folder of images per class (optionally under train/ and val/)"
    _check_folder(root, what)
    split = (root / "train").is_dir() and (root / "val").is_dir()
    tr_paths, tr_labels, classes = class_folder_samples(root / "train" if split else root)
    if not tr_paths:
        raise ConfigError(f"data.path: no images (.jpg/.png/...) found under '{root}'; expected {what}")
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


BUILDERS = {"digits": _digits, "synthetic": _synthetic, "imagefolder": _imagefolder}


class SSLDataModule(L.LightningDataModule):
    """Pre-training loader (shuffled, drop_last) plus labelled probe-train and validation sets."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.name not in BUILDERS:
            raise ConfigError(f"data.name: unknown dataset '{cfg.name}'; choose one of: {', '.join(BUILDERS)}")
        self.pretrain_set = self.probe_train_set = self.val_set = None
        self.class_names: list[str] = []

    def setup(self, stage=None):
        if self.pretrain_set is not None:
            return
        self.pretrain_set, self.probe_train_set, self.val_set, self.class_names = BUILDERS[self.cfg.name](self.cfg)
        n, bs = len(self.pretrain_set), self.cfg.batch_size
        if bs > n:
            raise ConfigError(
                f"data.batch_size: {bs} is larger than the training set ({n} images); use at most {n}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _loader(self, dataset, shuffle: bool, drop_last: bool, batch_size=None):
        workers = int(self.cfg.num_workers)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.cfg.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self):
        return self._loader(self.pretrain_set, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def probe_dataloaders(self, batch_size=None):
        """(probe-train, validation) loaders in a fixed order, for offline evaluation."""
        return (
            self._loader(self.probe_train_set, shuffle=False, drop_last=False, batch_size=batch_size),
            self._loader(self.val_set, shuffle=False, drop_last=False, batch_size=batch_size),
        )
