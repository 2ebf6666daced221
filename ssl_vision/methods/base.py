"""SSLMethod: everything the self-supervised methods share.

A method subclass builds its heads in ``__init__`` and implements ``forward_views(views)``, which
returns a dict with at least ``loss`` and ``feats`` (backbone features of the first view, used by
the online probe). The base class owns the backbone, the on-device augmentation, the online linear
probe (detached features, its own parameter group without weight decay), the optimizer and
warmup-cosine schedule with linear lr scaling by the global batch, and the momentum (EMA) encoder
machinery used by the MoCo variants.

It also owns the backbone's speed switches, so every method gets them: ``backbone.channels_last``
(NHWC convolution weights, see ``backbones.py``; the augmented views are made NHWC to match) and
``backbone.compile`` (``torch.compile`` of the backbone's forward, see ``configure_model``).
"""

from __future__ import annotations

import abc
import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..augment import EvalTransform, build_augment
from ..backbones import backbone_from_config
from ..config import ConfigError
from ..data import train_batches_done
from ..diagnostics import normalized_std, rankme
from ..optim import build_optimizer, check_optimizer_config, scaled_lr, split_decay, warmup_cosine
from ..rng import keyed_uniform


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False,
        last_bn_affine: bool = True, last_bias: bool | None = None) -> nn.Sequential:
    """Projection/prediction MLP: (Linear-BN-ReLU) x (layers-1), Linear, optional final BN.

    The last Linear has a bias unless a final BN follows (``last_bias`` overrides that)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn if last_bias is None else last_bias))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*mods)


def cosine_momentum(step: int, total_steps: int, m0: float) -> float:
    """EMA momentum from ``m0`` at step 0 to 1 at the last step (BYOL / MoCo v3 schedule)."""
    if total_steps <= 0:
        return m0
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, parameters only (BN stats stay own)."""
    for po, pt in zip(online.parameters(), target.parameters()):
        pt.mul_(momentum).add_(po.detach(), alpha=1.0 - momentum)


def probe_lr(cfg) -> float:
    """The online probe's learning rate: ``probe.lr``, or for ``auto`` one that suits the optimizer the
    probe shares with the method (AdamW's step is ~lr whatever the gradient's scale, SGD's is not)."""
    lr = cfg.probe.get("lr", "auto")
    if lr in (None, "auto"):
        return 1e-3 if cfg.optimizer.name == "adamw" else 0.1
    return float(lr)


class SSLMethod(L.LightningModule, abc.ABC):
    #: backbone families the method works with ("resnet", "vit")
    backbone_kinds: tuple[str, ...] = ("resnet", "vit")

    def __init__(self, cfg: DictConfig | dict, num_classes: int):
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True), "num_classes": num_classes})
        self.cfg = cfg
        check_optimizer_config(cfg.optimizer)
        size = int(cfg.data.image_size)
        self.backbone, self.feat_dim = backbone_from_config(cfg.backbone, size)  # copies keep its memory format
        self.channels_last = bool(cfg.backbone.get("channels_last", False))
        self.is_vit = hasattr(self.backbone, "blocks")
        kind = "vit" if self.is_vit else "resnet"
        if kind not in self.backbone_kinds:
            raise ConfigError(
                f"backbone: method '{cfg.method.name}' needs a {' or '.join(self.backbone_kinds)} backbone, "
                f"got '{cfg.backbone.name}' ({kind}); e.g. backbone=vit_tiny"
            )
        mean, std = list(cfg.data.mean), list(cfg.data.std)
        self.augment = build_augment(cfg.augment, size, mean, std, seed=int(cfg.get("seed", 0)))
        self.eval_transform = EvalTransform(size, mean, std, float(cfg.data.get("eval_crop_fraction", 1.0)))
        self.num_classes = num_classes
        # online probe: BatchNorm without affine, then linear (MAE's probe head; the offline probe
        # standardizes its features likewise): ViT [CLS] features share a large mean and vary little
        # around it, which a plain linear head trained alongside the encoder hardly learns from
        self.probe = nn.Sequential(nn.BatchNorm1d(self.feat_dim, affine=False),
                                   nn.Linear(self.feat_dim, num_classes)) if num_classes > 0 else None
        if self.probe is not None:
            self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self._momentum_pairs: list[tuple[nn.Module, nn.Module]] = []
        self._pending_rng_state = None  # a mid-epoch checkpoint's, restored at the next training batch
        self._batch_keys: tuple[torch.Tensor, int] | None = None  # (indexes, epoch) of the training batch
        self._compiled = False

    # --- subclass API -----------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_views(self, views: list[torch.Tensor]) -> dict:
        """Return ``{"loss": scalar, "feats": (B, feat_dim) backbone features of views[0], ...}``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of normalized images."""
        return self.backbone(x)

    # --- momentum encoder machinery ---------------------------------------------------------------
    def momentum_copy(self, online: nn.Module) -> nn.Module:
        """An EMA copy of ``online`` (no gradient) that is updated after every optimizer step."""
        target = copy.deepcopy(online)
        for p in target.parameters():
            p.requires_grad_(False)
        self._momentum_pairs.append((online, target))
        return target

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # the EMA follows every optimizer step (once per step under gradient accumulation), here rather
        # than in on_train_batch_end so that a checkpoint saved at this batch's end already holds it
        if self._momentum_pairs:
            step = self.global_step + 1  # Lightning counts the step once this hook returns
            m = cosine_momentum(step, int(self.trainer.estimated_stepping_batches), float(self.cfg.method.momentum))
            for online, target in self._momentum_pairs:
                ema_update(online, target, m)
            self.log("train/momentum", m)

    # --- speed switches ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """``backbone.compile``: compile the backbone (and its momentum copies) when the Trainer starts.

        ``nn.Module.compile`` compiles a module's forward in place, so parameter names, state dicts and
        checkpoints stay those of the plain model. ResNets: the whole forward. ViTs: each transformer
        block, because MAE's encoder runs the ViT's parts on the visible tokens rather than its forward
        (the blocks hold nearly all of its FLOPs; one compiled graph serves every block).
        """
        mode = self.cfg.backbone.get("compile", False)
        if not mode or self._compiled:
            return
        # the backbone's momentum twin, on either side (DINO's ``backbone`` is the EMA teacher)
        backbones = [self.backbone] + [m for pair in self._momentum_pairs if any(x is self.backbone for x in pair)
                                       for m in pair if m is not self.backbone]
        for backbone in backbones:
            for module in (backbone.blocks if self.is_vit else [backbone]):
                module.compile(mode=None if mode is True else str(mode))
        self._compiled = True

    # --- data path --------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx=0):
        """Training batches: draw every view's random parameters on the CPU, keyed by (seed, epoch, sample
        index, view), before the batch moves; they travel with it (``MultiViewAugment.plan``)."""
        if self._trainer is not None and self.trainer.training:
            images, sizes, labels, indexes = batch
            return images, sizes, labels, indexes, self.augment.plan(sizes, indexes, self.trainer.current_epoch)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx=0):
        """uint8 canvases on the device -> the method's views (training) or the evaluation view."""
        training = self._trainer is not None and self.trainer.training
        if training:
            images, sizes, labels, indexes, plans = batch
            if self._pending_rng_state is not None:  # resumed mid-epoch
                self._set_rng_state(self._pending_rng_state)
                self._pending_rng_state = None
            x = self.augment.apply(images, sizes, plans)
            self._batch_keys = (indexes, int(self.trainer.current_epoch))
        else:
            images, sizes, labels, indexes = batch
            x = self.eval_transform(images, sizes)
        if self.channels_last:  # NHWC views for the NHWC convolution weights
            x = [v.contiguous(memory_format=torch.channels_last) for v in x] if training else \
                x.contiguous(memory_format=torch.channels_last)
        return x, labels, indexes

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._batch_keys = None  # keys belong to one batch only

    def keyed_rand(self, stream: str, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) uniforms for this training batch, keyed by (seed, epoch, sample index, ``stream``) like the
        augmentation (``ssl_vision.rng``): the same for a sample whatever the number of ranks or a resume.
        Outside a Trainer's training batch (a direct ``forward_views`` call) they come from the global
        generator, shaped like ``like``'s batch."""
        if self._batch_keys is None or (like is not None and len(self._batch_keys[0]) != like.shape[0]):
            b = like.shape[0] if like is not None else 1
            return torch.rand(b, n, device=like.device if like is not None else None)
        indexes, epoch = self._batch_keys
        return keyed_uniform(int(self.cfg.get("seed", 0)), epoch, indexes, stream, n)

    # --- steps --------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        views, labels, _ = batch
        if len(labels) < 2:  # every image of the batch was unreadable (skipped by the loader)
            return None
        out = self.forward_views(views)
        self.log_collapse_diagnostics(out)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        if self.probe is not None:
            known = labels >= 0
            if known.sum() > 1:  # the probe's BatchNorm needs two samples (label_fraction can leave fewer)
                logits = self.probe(out["feats"].detach()[known]).float()  # bf16 under autocast
                probe_loss = F.cross_entropy(logits, labels[known])
                acc = (logits.argmax(1) == labels[known]).float().mean()
                self.log("train/probe_loss", probe_loss, on_step=False, on_epoch=True, sync_dist=True)
                self.log("train/probe_top1", acc, on_step=False, on_epoch=True, sync_dist=True)
                loss = loss + probe_loss
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def log_collapse_diagnostics(self, out: dict) -> None:
        """At the steps the logger writes (every ``trainer.log_every_n_steps``), log ``normalized_std`` and
        ``rankme`` (``ssl_vision.diagnostics``) of this rank's ``feats`` and, where ``forward_views`` returns
        one, its ``embedding`` (the method's projection): no work and no host sync on the other steps."""
        every = self.trainer.log_every_n_steps if self._trainer is not None else 0
        if not every or (self.global_step + 1) % every:  # Lightning writes at (steps done + 1) % every == 0
            return
        for key in ("feats", "embedding"):
            if out.get(key) is not None:
                x = out[key].detach()
                self.log(f"diag/{key}_std", normalized_std(x), on_step=True, on_epoch=False)
                self.log(f"diag/{key}_rankme", rankme(x), on_step=True, on_epoch=False)

    def validation_step(self, batch, batch_idx):
        if self.probe is None:
            return
        images, labels, _ = batch
        logits = self.probe(self.backbone(images))
        self.val_top1.update(logits, labels)
        self.log("val/probe_top1", self.val_top1, on_step=False, on_epoch=True, prog_bar=True)

    # --- checkpoint extras: random state, so a resumed run continues the same random stream ------
    def on_save_checkpoint(self, checkpoint):
        import random

        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_state"] = {
            # part-way through an epoch, the state is restored just before the next batch's augmentation
            # (a new loader iterator draws from the global RNG; the straight run drew at epoch start)
            "mid_epoch": self._trainer is not None and train_batches_done(self.trainer) > 0,
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # GPU-side augmentation draws here
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("rng_state")
        if not state:
            return
        if state.get("mid_epoch"):
            self._pending_rng_state = state
        else:
            self._set_rng_state(state)

    @staticmethod
    def _set_rng_state(state):
        import random

        import numpy as np

        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    # --- optimization -------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        accum = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return int(self.cfg.data.batch_size) * world * accum

    def param_groups(self) -> list[dict]:
        o = self.cfg.optimizer
        lr = scaled_lr(float(o.lr), self.global_batch_size(), bool(o.get("scale_lr", True)))
        method_params = nn.ModuleDict({n: m for n, m in self.named_children() if n != "probe"})
        decay, no_decay = split_decay(method_params, bool(o.get("exclude_bias_norm", True)))
        groups = [
            {"name": "decay", "params": decay, "lr": lr, "weight_decay": float(o.weight_decay)},
            {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0, "lars_exclude": True},
        ]
        if self.probe is not None:
            groups.append({"name": "probe", "params": list(self.probe.parameters()),
                           "lr": probe_lr(self.cfg), "weight_decay": 0.0, "lars_exclude": True})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        o = self.cfg.optimizer
        optimizer = build_optimizer(o, self.param_groups())
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = int(round(float(o.get("warmup_epochs", 0)) * total / epochs))
        min_ratio = float(o.get("min_lr_ratio", 0.0))
        def lr_factor(step):
            return warmup_cosine(step, warmup, total, min_ratio)

        # a group with ``fixed_lr`` keeps its initial lr (SimSiam's predictor)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [(lambda step: 1.0) if g.get("fixed_lr") else lr_factor for g in optimizer.param_groups])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
