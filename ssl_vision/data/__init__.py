"""Data: formats on disk -> uint8 canvases on the CPU -> batches for the device.

CPU-side work is only decoding: each image becomes a fixed-size uint8 canvas holding the image at
its own aspect ratio, plus its size; all random augmentation happens later, on the device, on the
whole batch (``ssl_vision.augment``). Batches are ``(images (B, 3, C, C) uint8, sizes (B, 4),
labels (B,), indexes (B,))``; unlabelled samples carry label -1.

Where things live:

- ``formats``: each ``data.name`` (digits, synthetic, CIFAR, STL-10, ImageNet and its subsets,
  image folders) - finding files, reading labels, the train / validation splits.
- ``decoding``: image file -> canvas + size (JPEG draft mode, any PIL mode to RGB, aspect kept).
- ``datasets``: the Dataset classes and the collate function that skips unreadable files.
- ``resume``: the training loader's position in its epoch, for exact mid-epoch resume.
- ``datamodule``: ``SSLDataModule`` (the loaders, label fractions) and ``SkippedFilesReport``.
"""

from .datamodule import SkippedFilesReport, SSLDataModule
from .datasets import ConcatImages, ImageFiles, ImageSubset, SkipUnreadable, TensorImages
from .decoding import fit_size, load_image, resize_uint8
from .formats import BUILDERS, imagenet100_classes, list_images, stratified_split, synthetic_images
from .resume import train_batches_done

__all__ = ["BUILDERS", "ConcatImages", "ImageFiles", "ImageSubset", "SSLDataModule", "SkipUnreadable",
           "SkippedFilesReport", "TensorImages", "fit_size", "imagenet100_classes", "list_images", "load_image",
           "resize_uint8", "stratified_split", "synthetic_images", "train_batches_done"]
