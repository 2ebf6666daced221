"""The peers' input pipeline, for the end-to-end comparison of ``tools/gpu_check.py``.

What solo-learn (without DALI) and lightly do: DataLoader workers decode each JPEG with PIL and run a
torchvision transform per view on it, image by image, and the training process receives the augmented,
normalized float32 views.

- solo-learn ``solo/data/pretrain_dataloader.py``: ``ImageFolder`` wrapped to also return the index
  (``dataset_with_index``: ``(index, views, label)``), ``ImagenetTransform`` (RandomResizedCrop bicubic,
  RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur: PIL ``ImageFilter.GaussianBlur`` with
  a radius drawn from [0.1, 2]), RandomApply(Solarization), RandomHorizontalFlip, ToTensor, Normalize) applied
  once per crop by ``NCropAugmentation`` / ``FullTransformPipeline``; ``prepare_dataloader``: shuffle,
  ``pin_memory=True``, ``drop_last=True``.
- lightly ``lightly/transforms/simclr_transform.py``: the same operations (``SimCLRViewTransform``) twice
  through ``MultiViewTransform``.

Each view's transform is built from the suite's own settings of that view (``model.augment.views``: crop
scale and ratio, interpolation, jitter, grayscale, blur, solarize, flip probabilities), so both pipelines
produce the same augmentation of the same images and only where it runs differs. The workers here are
persistent, as the suite's are (solo-learn restarts its workers every epoch; persistent ones favour the peers).

``peer_fed(method_class)`` is the method fed by such a loader: the same LightningModule with the suite's data
hooks replaced by a pass-through (the views arrive ready-made), so the training step is the suite's own.
"""

from __future__ import annotations

import random

import torch
from PIL import ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

INTERPOLATION = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}


class PILGaussianBlur:
    """PIL's Gaussian blur with a radius drawn uniformly from ``sigma`` (solo-learn's ``GaussianBlur``, MoCo's)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """``ImageOps.solarize`` at 128 (solo-learn's ``Solarization``)."""

    def __call__(self, img):
        return ImageOps.solarize(img, 128)


def view_transform(view: dict, mean, std) -> transforms.Compose:
    """The torchvision pipeline of one view, from the suite's view settings (``MultiViewAugment.views``)."""
    size = int(view["size"])
    blur = float(view["blur_prob"]) if size >= int(view["blur_min_size"]) else 0.0  # the suite's rule
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=tuple(view["crop_scale"]), ratio=tuple(view["crop_ratio"]),
                                     interpolation=INTERPOLATION[view["interpolation"]]),
        transforms.RandomApply([transforms.ColorJitter(float(view["brightness"]), float(view["contrast"]),
                                                       float(view["saturation"]), float(view["hue"]))],
                               p=float(view["jitter_prob"])),
        transforms.RandomGrayscale(p=float(view["grayscale_prob"])),
        transforms.RandomApply([PILGaussianBlur(view["blur_sigma"])], p=blur),
        transforms.RandomApply([PILSolarize()], p=float(view["solarize_prob"])),
        transforms.RandomHorizontalFlip(p=float(view["flip_prob"])),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class MultiView:
    """One transform per view, each applied to the same decoded image: the list of views."""

    def __init__(self, view_transforms):
        self.view_transforms = list(view_transforms)

    def __call__(self, img):
        return [t(img) for t in self.view_transforms]


class IndexedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` returning ``(index, views, label)`` (solo-learn's ``dataset_with_index``)."""

    def __getitem__(self, index):
        views, label = super().__getitem__(index)
        return index, views, label


def peer_loader(root, views: list[dict], mean, std, batch_size: int, workers: int, pin_memory: bool,
                seed: int = 0) -> DataLoader:
    """The peers' training loader over the class folders under ``root``: batches ``[indexes, [view, ...], labels]``."""
    dataset = IndexedImageFolder(str(root), transform=MultiView(view_transform(v, mean, std) for v in views))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin_memory,
                      drop_last=True, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def peer_fed(method_class: type) -> type:
    """``method_class`` taking its views from ``peer_loader``: no CPU-side planning, no device augmentation;
    the views move to the device as float32 and go to the method's own training step (channels-last when the
    backbone is, as the suite's hook does)."""

    class PeerFed(method_class):
        def on_before_batch_transfer(self, batch, dataloader_idx=0):
            return batch

        def on_after_batch_transfer(self, batch, dataloader_idx=0):
            indexes, views, labels = batch
            if self.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            self._batch_keys = (indexes, int(self.trainer.current_epoch))
            return views, labels, indexes

    PeerFed.__name__ = PeerFed.__qualname__ = f"PeerFed{method_class.__name__}"
    return PeerFed
