"""Datasets and the loaders' collate function.

Every dataset yields ``(image uint8 (3, C, C), size (4,) int64, label, index)``: the canvas, where
the image lies on it and its original size (``decoding``), the class (-1: unlabelled) and the
sample's index in the dataset, which keys its random augmentation (``ssl_vision.rng``) and puts
sharded features back in order. ``SkipUnreadable`` stacks them into batches
``(images (B, 3, C, C), sizes (B, 4), labels (B,), indexes (B,))``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .decoding import load_image

log = logging.getLogger("ssl_vision.data")


class TensorImages(Dataset):
    """In-memory uint8 images ``(N, 3, H, W)`` with integer labels; each image fills its canvas."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
        self.images, self.labels = images, torch.as_tensor(labels).long()
        h, w = images.shape[-2:]
        self.size = torch.tensor([h, w, h, w], dtype=torch.long)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.size, self.labels[i], i


class ImageFiles(Dataset):
    """Image files decoded on access to an RGB uint8 ``canvas x canvas`` tensor and its size
    (``decoding.load_image``).

    A file that cannot be decoded yields ``(None, None, label, i)`` (dropped by ``SkipUnreadable``);
    the first failure logs one warning naming the file, later epochs skip it without retrying. Flags
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
                image, size = load_image(self.path(i), self.canvas)
                return image, size, label, i
            except Exception as e:  # a bad file must never end the run
                self._bad[i] = 1
                path = self.path(i)
                reason = one_line(e).replace(f" {path!r}", "").replace(path, "the file")  # name it once
                log.warning("skipping unreadable image '%s' (%s)", path, reason)
        with self._skipped.get_lock():
            self._skipped.value += 1
        return None, None, label, i

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
        image, size, _, _ = self.base[i if self.indices is None else int(self.indices[i])]
        return image, size, self.labels[i], i


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
        image, size, label, _ = self.parts[k][i - int(self.offsets[k])]
        return image, size, label, i


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
            return torch.empty(0, 3, c, c, dtype=torch.uint8), torch.empty(0, 4, dtype=torch.long), empty, empty.clone()
        images = stack_images([b[0] for b in good])
        sizes = torch.from_numpy(np.stack([b[1].numpy() for b in good]))
        labels = torch.tensor([int(b[2]) for b in good], dtype=torch.long)
        return images, sizes, labels, torch.tensor([int(b[3]) for b in good], dtype=torch.long)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 canvases into one batch tensor, copying each once. In a loader worker the batch is
    written straight into shared memory (as torch's default collate does), so handing it to the training
    process copies nothing more; in the training process itself (``num_workers=0``) numpy stacks it,
    since torch's intra-op threads would thrash there on a busy machine."""
    if get_worker_info() is None:
        return torch.from_numpy(np.stack([im.numpy() for im in images]))
    first = images[0]
    storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(images, 0, out=out)


def file_datasets(dataset) -> list[ImageFiles]:
    """The ``ImageFiles`` a dataset reads from (through subsets and concatenations)."""
    if isinstance(dataset, ImageFiles):
        return [dataset]
    if isinstance(dataset, ImageSubset):
        return file_datasets(dataset.base)
    if isinstance(dataset, ConcatImages):
        return [f for p in dataset.parts for f in file_datasets(p)]
    return []


def one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 200 else text[:197] + "..."
