"""``FineTuner``: the LightningModule that fine-tunes a classifier end to end.

It is an ``SSLMethod`` whose objective is classification, so it shares the pre-training machinery as is:
the augmentation planned on the CPU and applied on the device (``augment.views`` of the fine-tuning
preset: crop, flip, RandAugment, random erasing, keyed per sample), the evaluation view (``EvalTransform``:
``data.eval_crop_fraction``, the preset's ``eval_interpolation``), the RNG state in checkpoints (exact
mid-epoch resume), the non-finite loss agreed over ranks, ``backbone.compile`` / ``channels_last``. It has
no online probe; ``backbone`` is the whole timm classifier (``finetune.model``).

Per training batch, after the augmentation: timm's ``Mixup`` (mixup / cutmix with label smoothing folded
into the targets) on the device, then the loss MAE's main_finetune.py picks - ``SoftTargetCrossEntropy`` with
mixup, else ``LabelSmoothingCrossEntropy`` with smoothing, else cross-entropy. Mixup's own draws (timm takes
them from NumPy's global generator) come from a generator seeded by (seed, epoch, the batch's first sample
index), so they are the same after a resume and differ between ranks. Validation: cross-entropy, top-1 and
top-5 (torchmetrics, summed over ranks: every validation image is evaluated once, ``FineTuneData``).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassAccuracy

from ..augment import EvalTransform
from ..methods.base import SSLMethod
from ..optim import scaled_lr
from ..rng import keyed_uniform
from .model import build_optimizer, decay_groups, layer_decay_groups, schedule_lr

MIXUP_MODES = ("batch", "pair", "elem")


def build_mixup(ft, num_classes: int):
    """timm's ``Mixup`` from ``finetune.mixup`` (MAE's arguments; null: off), label smoothing included."""
    from timm.data import Mixup

    m = ft.get("mixup")
    if not m or (float(m.get("mixup_alpha", 0)) <= 0 and float(m.get("cutmix_alpha", 0)) <= 0
                 and m.get("cutmix_minmax") is None):
        return None
    mode = str(m.get("mode", "batch"))
    if mode not in MIXUP_MODES:
        from ..config import ConfigError

        raise ConfigError(f"finetune.mixup.mode: unknown '{mode}'; choose one of: {', '.join(MIXUP_MODES)}")
    minmax = m.get("cutmix_minmax")
    return Mixup(mixup_alpha=float(m.get("mixup_alpha", 0)), cutmix_alpha=float(m.get("cutmix_alpha", 0)),
                 cutmix_minmax=None if minmax is None else [float(v) for v in minmax], prob=float(m.get("prob", 1.0)),
                 switch_prob=float(m.get("switch_prob", 0.5)), mode=mode,
                 label_smoothing=float(ft.get("label_smoothing", 0.0)), num_classes=num_classes)


def build_criterion(ft, mixup) -> torch.nn.Module:
    """MAE main_finetune.py: soft-target cross-entropy under mixup (smoothing is in the targets), else
    timm's label-smoothing cross-entropy, else plain cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    smoothing = float(ft.get("label_smoothing", 0.0))
    return LabelSmoothingCrossEntropy(smoothing=smoothing) if smoothing > 0 else torch.nn.CrossEntropyLoss()


@contextlib.contextmanager
def numpy_seeded(seed):
    """NumPy's global generator seeded with ``seed`` (an int or a list of 32-bit words) inside the block, its
    state restored after it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class FineTuner(SSLMethod):
    def __init__(self, cfg: DictConfig | dict, num_classes: int):
        super().__init__(cfg, 0)  # no online probe
        cfg = self.cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True), "num_classes": num_classes})
        self.num_classes = num_classes
        ft = cfg.finetune
        size = int(cfg.data.image_size)
        self.eval_transform = EvalTransform(size, list(cfg.data.mean), list(cfg.data.std),
                                            float(cfg.data.get("eval_crop_fraction", 1.0)),
                                            str(ft.get("eval_interpolation", "bilinear")))
        self.mixup = build_mixup(ft, num_classes)
        self.criterion = build_criterion(ft, self.mixup)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro",
                                           validate_args=False)
        self.validated_step = -1  # the global step of the last validation (the final metrics need one there)

    def forward_views(self, views: list[torch.Tensor], targets: torch.Tensor | None = None) -> dict:
        """Logits of the first view and, given (hard or mixed soft) ``targets``, the fine-tuning loss."""
        logits = self.backbone(views[0])
        out = {"logits": logits, "feats": logits}
        if targets is not None:
            out["loss"] = self.criterion(logits.float(), targets)
        return out

    # --- mixup: timm's, its NumPy draws seeded per batch on the CPU (a device read would be a host sync) -------
    def mixup_seed(self, indexes: torch.Tensor, epoch: int) -> list[int]:
        """NumPy seed words (2 x 24 bits) for the batch's mixup draws, keyed by (seed, epoch, first sample index)."""
        first = indexes[:1].cpu() if len(indexes) else torch.zeros(1, dtype=torch.long)
        u = keyed_uniform(int(self.cfg.get("seed", 0)), epoch, first, "mixup", 2)[0]
        return [int(v * 2**24) for v in u.tolist()]

    def on_before_batch_transfer(self, batch, dataloader_idx=0):
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.mixup is not None and len(batch) == 5:  # a training batch: (images, sizes, labels, indexes, plans)
            batch[4][0]["mixup_seed"] = self.mixup_seed(batch[3], int(self.trainer.current_epoch))  # a host int
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx=0):
        if len(batch) == 5:
            self._mixup_seed = batch[4][0].get("mixup_seed")
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup on the batch (in place) with this batch's seed; without mixup, the labels."""
        if self.mixup is None:
            return x, labels
        seed = getattr(self, "_mixup_seed", None)
        with numpy_seeded(seed) if seed is not None else contextlib.nullcontext():
            return self.mixup(x, labels)

    def training_step(self, batch, batch_idx):
        views, labels, _ = batch
        images = len(labels)
        if images == 0:  # every image of this rank's batch was unreadable
            if self.trainer.world_size == 1:
                return None
            views, labels = self._stand_in(views)
        if images > 0:
            x, targets = self.mix(views[0], labels)
        else:
            x, targets = views[0], labels.clamp(min=0)
        loss = self.forward_views([x], targets)["loss"]
        if images == 0:
            loss = loss * 0.0
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=max(images, 1))
        self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=False, batch_size=max(images, 1))
        self._record_non_finite(loss)
        # MAE logs the largest group lr (the head's); a CPU tensor, so no copy to the GPU
        lr = max(g["lr"] for g in self.trainer.optimizers[0].param_groups)
        self.log("train/lr", torch.tensor(lr), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels, _ = batch
        logits = self.backbone(images).float()
        loss = F.cross_entropy(logits, labels)
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log("val/top1", self.val_top1, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/top5", self.val_top5, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_step = int(self.trainer.global_step)

    # --- optimization: MAE's layer-wise lr decay and schedule ------------------------------------------------
    def param_groups(self) -> list[dict]:
        ft, o = self.cfg.finetune, self.cfg.optimizer
        decay = ft.get("layer_decay")
        if decay is not None and self.is_vit:
            nwd = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
            return layer_decay_groups(self.backbone, float(o.weight_decay), float(decay), set(nwd))
        return decay_groups(self.backbone, float(o.weight_decay), bool(o.get("exclude_bias_norm", True)))

    def base_lr(self) -> float:
        o = self.cfg.optimizer
        return scaled_lr(float(o.lr), self.global_batch_size(), bool(o.get("scale_lr", True)))

    def configure_optimizers(self):
        ft = self.cfg.finetune
        lr = self.base_lr()
        optimizer = build_optimizer(self.cfg.optimizer, self.param_groups(), lr)
        self.trainer.estimated_stepping_batches  # noqa: B018 - sets up the training loader, so its length is known
        steps_per_epoch = self.trainer.num_training_batches / max(1, self.trainer.accumulate_grad_batches)
        epochs = float(self.trainer.max_epochs or 1)
        if not math.isfinite(steps_per_epoch) or steps_per_epoch <= 0:
            steps_per_epoch = 1.0
        warmup, min_lr = float(ft.get("warmup_epochs", 0)), float(ft.get("min_lr", 0.0))

        def factor(step: int) -> float:  # each group's lr = lr_scale x schedule_lr(...) (MAE's adjust_learning_rate)
            return schedule_lr(step / steps_per_epoch, lr, epochs, warmup, min_lr) / lr

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
