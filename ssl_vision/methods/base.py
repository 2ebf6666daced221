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
import logging
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
from ..distributed import broadcast_tensors_, gather_no_grad
from ..optim import build_optimizer, check_optimizer_config, scaled_lr, split_decay, warmup_cosine
from ..online_knn import OnlineKNN
from ..rng import keyed_uniform

log = logging.getLogger(__name__)


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
    """target = momentum * target + (1 - momentum) * online, parameters only (BN stats stay own).

    Two multi-tensor kernels for all parameters (``torch._foreach_*``) rather than two per parameter."""
    targets = list(target.parameters())
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, [p.detach() for p in online.parameters()], alpha=1.0 - momentum)


class LocalBatchNorm1d(nn.Module):
    """``nn.BatchNorm1d(num_features, affine=False)`` - the same statistics, defaults and state-dict keys -
    that keeps per-rank statistics under ``trainer.sync_batchnorm``: ``SyncBatchNorm.convert_sync_batchnorm``
    converts every ``_BatchNorm`` subclass, and this is none. The online probe uses it, so that it adds no
    collective to the step (and, with SyncBatchNorm, none that a rank could miss)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, self.momentum,
                            self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine=False"


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
        # around it, which a plain linear head trained alongside the encoder hardly learns from.
        # Its BatchNorm stays per rank (LocalBatchNorm1d) under trainer.sync_batchnorm
        self.probe = nn.Sequential(LocalBatchNorm1d(self.feat_dim),
                                   nn.Linear(self.feat_dim, num_classes)) if num_classes > 0 else None
        self.probe_every = int(cfg.get("probe", {}).get("every_n_steps", 1) or 1)
        if self.probe_every < 1:
            raise ConfigError(f"probe.every_n_steps: {self.probe_every} must be a positive number of steps (1: every step)")
        if self.probe is not None:
            # validate_args=False: the argument checks read label values on the host at every batch
            self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)
        self._momentum_pairs: list[tuple[nn.Module, nn.Module]] = []
        self._pending_rng_state = None  # a mid-epoch checkpoint's, restored at the next training batch
        self._batch_keys: tuple[torch.Tensor, int] | None = None  # (indexes, epoch) of the training batch
        self._compiled = False
        self._non_finite: torch.Tensor | None = None  # this rank's first non-finite loss: (step, value)
        self.online_knn = OnlineKNN.from_config(cfg, num_classes)  # eval.online_knn; None: off or no labels

    # --- subclass API -----------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_views(self, views: list[torch.Tensor]) -> dict:
        """Return ``{"loss": scalar, "feats": (B, feat_dim) backbone features of views[0], ...}``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of normalized images."""
        return self.backbone(x)

    def project_two_views(self, views: list[torch.Tensor]) -> dict:
        """``{"feats": [f1, f2], "z": [z1, z2]}``: backbone features and ``self.projector`` outputs of the first two
        views, each view through the networks on its own (BYOL, SimSiam, Barlow Twins, VICReg)."""
        feats = [self.backbone(v) for v in views[:2]]
        return {"feats": feats, "z": [self.projector(f) for f in feats]}

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
        step = self.global_step + 1  # Lightning counts the step once this hook returns
        # the EMA follows every optimizer step (once per step under gradient accumulation), here rather
        # than in on_train_batch_end so that a checkpoint saved at this batch's end already holds it
        if self._momentum_pairs:
            m = cosine_momentum(step, int(self.trainer.estimated_stepping_batches), float(self.cfg.method.momentum))
            for online, target in self._momentum_pairs:
                ema_update(online, target, m)
            self.log("train/momentum", torch.tensor(m))  # a CPU tensor: a Python float would be copied to the GPU
        if self._failure_check_due(step, batch_idx):
            self.check_non_finite()

    # --- failures that every rank must agree on ------------------------------------------------------
    def on_train_start(self) -> None:
        # every rank holds the record from the start, so every rank joins each check's gather
        self._non_finite = torch.tensor([-1.0, 0.0], device=self.device)

    def _record_non_finite(self, loss: torch.Tensor) -> None:
        """Keep this rank's first non-finite loss as (step, value) on the device: no host sync per step."""
        if self._non_finite is None:
            self._non_finite = torch.tensor([-1.0, 0.0], device=loss.device)
        state, value = self._non_finite, loss.detach().float()
        first = ~torch.isfinite(value) & (state[0] < 0)
        self._non_finite = torch.stack([torch.where(first, float(self.global_step), state[0]),
                                        torch.where(first, value, state[1])])

    def _failure_check_due(self, step: int, batch_idx: int) -> bool:
        """After every ``trainer.log_every_n_steps``-th step (where Lightning reads the logged values anyway),
        every step that writes a checkpoint (``checkpoint.every_n_steps``), an epoch's and the run's last."""
        t = self.trainer
        every_ckpt = int((self.cfg.get("checkpoint") or {}).get("every_n_steps") or 0)
        return (step % max(1, int(t.log_every_n_steps)) == 0 or (every_ckpt > 0 and step % every_ckpt == 0)
                or batch_idx + 1 >= t.num_training_batches or 0 < t.max_steps <= step)

    def check_non_finite(self) -> None:
        """Raise ``FloatingPointError`` on every rank, with one message, if any rank has seen a non-finite loss.

        Called on all ranks at the same steps (``_failure_check_due``): one all_gather of two numbers per
        rank and one host read, every few steps rather than a host sync in each step. In between, a rank's
        NaN already reaches every rank's weights through the gradient all-reduce, and ``LastCheckpoint``
        never saves non-finite weights, so the last checkpoint stays the last good state.
        """
        if self._non_finite is None:
            return
        states = gather_no_grad(self._non_finite[None]).tolist()  # (world, 2)
        bad = sorted((int(s), r, v) for r, (s, v) in enumerate(states) if s >= 0)
        if bad:
            step, first, value = bad[0]
            where = f" (rank {first} of {len(states)})" if len(states) > 1 else ""
            raise FloatingPointError(f"non-finite loss {value} at step {step}{where}")

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
        sync_bn = bool(self.cfg.trainer.get("sync_batchnorm")) and self.trainer.world_size > 1 \
            and self.trainer.strategy.root_device.type == "cuda"  # train.py leaves it off on CPUs
        if sync_bn and not self.is_vit:
            log.warning("backbone.compile with trainer.sync_batchnorm: torch.compile breaks the graph at every "
                        "SyncBatchNorm (pytorch/pytorch#161302), so a ResNet compiles into one small graph per "
                        "layer and gains little; use backbone.compile=false with SyncBatchNorm, or "
                        "trainer.sync_batchnorm=false (per-GPU statistics) to compile")
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
    # Nothing here reads a device value on the host (no .item(), no boolean-mask indexing, no Python
    # branch on a tensor): each would make the CPU wait for the GPU every step (tools/bench.py counts them).
    def training_step(self, batch, batch_idx):
        views, labels, _ = batch
        images = len(labels)
        if images == 0:  # every image of this rank's batch was unreadable (the loader skips such files)
            if self.trainer.world_size == 1:
                return None  # nothing to learn from: Lightning skips the step
            log.warning("step %d: every image of a training batch on rank %d was unreadable; it takes part in "
                        "the step with zero weight (DDP needs every rank in its collectives)",
                        self.global_step, self.global_rank)
            views, labels = self._stand_in(views)
        out = self.forward_views(views)
        self.log_collapse_diagnostics(out)
        if self._online_knn_due():
            self.online_knn.add_bank(out["feats"], labels)  # the first view's features: no extra pass
        loss = out["loss"]
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=images)
        # the progress bar shows the last epoch's mean: Lightning reads progress-bar values on the host
        # after every batch, so a per-step value there would be a host sync per step
        self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=False, batch_size=images)
        if self.probe is not None and not self.probe_due():
            # every rank skips the same steps; a zero term keeps the probe's parameters in DDP's gradient
            # reduction, and on_before_optimizer_step drops their (zero) gradients so the optimizer leaves them
            loss = loss + 0.0 * sum(p.sum() for p in self.probe.parameters())
        elif self.probe is not None:
            probe_loss, correct, labelled = self.online_probe(out["feats"], labels)
            # epoch means over the labelled samples of all ranks (count-weighted)
            self.log("train/probe_loss", probe_loss, on_step=False, on_epoch=True, sync_dist=True,
                     batch_size=labelled)
            self.log("train/probe_top1", correct / labelled.clamp(min=1), on_step=False, on_epoch=True,
                     sync_dist=True, batch_size=labelled)
            loss = loss + probe_loss
        if images == 0:
            loss = loss * 0.0
        self._record_non_finite(loss)
        # a CPU tensor: Lightning would copy a Python float to the GPU, which waits for the GPU
        self.log("train/lr", torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"]), on_step=True,
                 on_epoch=False)
        return loss

    def _stand_in(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Zero views of the configured batch size, without labels: what an empty batch trains on under DDP,
        so that every rank runs the same gathers, SyncBatchNorm and gradient all-reduce with equal shapes."""
        n = int(self.cfg.data.batch_size)
        views = [v.new_zeros((n, *v.shape[1:])) for v in views]
        return views, torch.full((n,), -1, dtype=torch.long, device=views[0].device)

    def probe_due(self) -> bool:
        """Whether this training step trains the online probe: every ``probe.every_n_steps``-th optimizer step
        (1: all). Larger values amortize its cost (MAE's probe needs a no-grad full-image forward of its own)."""
        return self.probe is not None and self.global_step % self.probe_every == 0

    def features_needed(self) -> bool:
        """Whether this training step reads the backbone features of the first view (the online probe, or the
        online kNN's bank): a method that computes them only for these (MAE) skips them otherwise."""
        return self.probe_due() or self._online_knn_due()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.probe is not None and not self.probe_due():
            for p in self.probe.parameters():  # a step without the probe: no update (nor momentum, nor decay)
                p.grad = None

    def online_probe(self, feats: torch.Tensor, labels: torch.Tensor):
        """The online probe's (loss, correct, labelled) on detached ``feats`` (B, D); label -1 = unlabelled.

        Runs on every rank at every step, whatever its labels, so the set of parameters that get a
        gradient (DDP's reducer needs all of them) and of collectives never depends on a rank's data: the
        head sees the whole batch (its BatchNorm statistics too), and the cross-entropy is summed over the
        labelled samples and divided by max(count, 1) - 0 with a zero gradient on a rank without labels,
        where a plain mean over none (``ignore_index``) would be NaN. No count leaves the device.
        """
        logits = self.probe(feats.detach().float()).float()  # bf16 under autocast
        known = labels >= 0
        labelled = known.sum()
        ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        loss = (ce * known).sum() / labelled.clamp(min=1)
        correct = ((logits.argmax(1) == labels) & known).sum()
        return loss, correct, labelled

    def on_validation_epoch_start(self) -> None:
        # ranks without SyncBatchNorm (CPU, the probe's LocalBatchNorm1d) keep their own running statistics;
        # validate with rank 0's, the ones its checkpoint holds (a few small broadcasts per epoch)
        norms = [m for m in self.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, LocalBatchNorm1d))]
        broadcast_tensors_([b for m in norms for b in m.buffers()], src=0)

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
        images, labels, indexes = batch
        feats = self.backbone(images)
        if self._online_knn_due():
            self.online_knn.add_queries(feats, labels, indexes)
        logits = self.probe(feats.float())
        self.val_top1.update(logits, labels)
        self.log("val/probe_top1", self.val_top1, on_step=False, on_epoch=True, prog_bar=True)

    # --- online kNN (ssl_vision/online_knn.py): bank from the training steps, queries from validation ------
    def _online_knn_due(self) -> bool:
        return self.online_knn is not None and not (self._trainer is not None and self.trainer.sanity_checking) \
            and self.online_knn.due(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        if self.online_knn is not None:
            self.online_knn.reset_bank()  # a bank holds one epoch

    def on_validation_epoch_end(self) -> None:
        if self._online_knn_due():
            top1 = self.online_knn.compute(self.device)  # collective: every rank, same value
            if top1 is not None:
                self.log("val/knn_top1", top1, on_epoch=True, sync_dist=True)

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
