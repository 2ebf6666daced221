"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning") and
MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

Both keep an EMA copy of backbone + projector (the base class's momentum machinery: cosine
schedule from ``method.momentum`` to 1, one update per optimizer step) that produces the keys.
v2 contrasts each query with its key and a queue of keys from earlier batches; v3 drops the queue,
adds a query-side predictor and contrasts against the keys of the whole (gathered) batch.
"""

from __future__ import annotations

import logging
import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..distributed import broadcast_tensors_, gather_no_grad, rank
from ..losses import moco_v2_loss, moco_v3_loss
from ..pos_embed import set_sincos_pos_embed
from .base import SSLMethod, mlp

log = logging.getLogger(__name__)


def _xavier_patch_embed(proj: nn.Conv2d) -> None:
    """Xavier-uniform over the flattened patch (fan_in C*p*p, fan_out D), zero bias."""
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    with torch.no_grad():
        proj.weight.uniform_(-bound, bound)
        if proj.bias is not None:
            proj.bias.zero_()


@torch.no_grad()
def moco_v3_vit_init(vit: nn.Module) -> None:
    """MoCo v3's ViT initialisation (facebookresearch/moco-v3 vits.py ``VisionTransformerMoCo.__init__``;
    solo-learn's solo/backbones/vit/vit_mocov3.py is the same): every Linear xavier-uniform with zero
    bias, the fused qkv Linear with the bound of each Q/K/V part (``sqrt(6 / (out/3 + in))``); the
    class token N(0, 1e-6); the patch projection xavier-uniform over the flattened patch, zero bias.
    (timm's ``weight_init='moco'`` leaves the patch projection at the Conv2d default.)
    """
    for name, mod in vit.named_modules():
        if isinstance(mod, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (mod.weight.shape[0] // 3 + mod.weight.shape[1]))
                mod.weight.uniform_(-bound, bound)
            else:
                nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                mod.bias.zero_()
    if getattr(vit, "cls_token", None) is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)
    _xavier_patch_embed(vit.patch_embed.proj)


class _MoCo(SSLMethod):
    """What both versions share: projector + its momentum twin, and computing the keys."""

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.prepare_backbone()
        self.projector = self.build_projector()
        self.momentum_backbone = self.momentum_copy(self.backbone)
        self.momentum_projector = self.momentum_copy(self.projector)

    def prepare_backbone(self) -> None:
        """Hook: change the online backbone before its momentum copy is taken."""

    @abc.abstractmethod
    def build_projector(self) -> nn.Module:
        """The online projection head (its momentum twin is copied from it)."""

    @torch.no_grad()
    def keys(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Momentum-encoder projections (B, D) of each view; its BatchNorm keeps its own statistics."""
        return [self.momentum_projector(self.momentum_backbone(v)) for v in views]


class MoCoV2(_MoCo):
    """MoCo v2, symmetrized: ``(L(q1, k2, queue_2) + L(q2, k1, queue_1)) / 2``.

    ``queue`` (2, K, D) holds the last K keys of each view from all ranks, ``queue_ptr`` where the
    next batch goes; both are persistent buffers, so they are saved in and restored from checkpoints.

    Under DDP the queue is identical on every rank by construction: every rank enqueues the same
    all-gathered keys at the same pointer (broadcast once at fit start, so even a differently seeded
    start agrees). DDP therefore runs without ``broadcast_buffers`` (``ssl_vision.devices``), which would
    copy the queue (64 MiB at the paper's size) from rank 0 before every forward.
    """

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        k, dim = int(self.cfg.method.queue_size), int(self.cfg.method.proj_output_dim)
        if k <= 0:
            raise ConfigError(f"method.queue_size: must be a positive number of keys, got {k}")
        self.register_buffer("queue", F.normalize(torch.randn(2, k, dim), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def build_projector(self) -> nn.Module:
        m = self.cfg.method  # MoCo v2's head: Linear-ReLU-Linear, no BatchNorm
        return nn.Sequential(nn.Linear(self.feat_dim, m.proj_hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(m.proj_hidden_dim, m.proj_output_dim))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        per_step, k = int(self.cfg.data.batch_size) * self.trainer.world_size, self.queue.shape[1]
        self.check_queue_size(per_step)
        images = len(getattr(self.trainer.datamodule, "pretrain_set", None) or ())
        if k > images > 0:
            log.warning("method.queue_size=%d exceeds the %d training images, so a query meets old keys of its own "
                        "image among the negatives (and the queue starts as random keys); small data wants a smaller "
                        "queue, e.g. method.queue_size=%d", k, images, per_step * max(1, images // (5 * per_step)))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        broadcast_tensors_([self.queue, self.queue_ptr], src=0)

    def check_queue_size(self, keys_per_step: int) -> None:
        k = self.queue.shape[1]
        if k % keys_per_step:
            raise ConfigError(
                f"method.queue_size: {k} is not a multiple of the global batch {keys_per_step} "
                f"(data.batch_size x devices), which is enqueued every step; use e.g. "
                f"method.queue_size={max(keys_per_step, round(k / keys_per_step) * keys_per_step)}"
            )

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (2, N, D), gathered from all ranks, at the pointer; the pointer wraps to 0.

        The pointer stays on the device: the rows to write are ``ptr + arange(N)`` (N divides K, so they
        never wrap inside a batch), computed there rather than read back with ``int(queue_ptr)``."""
        n, k = keys.shape[1], self.queue.shape[1]
        self.check_queue_size(n)
        rows = self.queue_ptr + torch.arange(n, device=self.queue.device)
        self.queue.index_copy_(1, rows, F.normalize(keys.to(self.queue.dtype), dim=-1))  # bf16 keys: normalize in fp32
        self.queue_ptr.copy_((self.queue_ptr + n) % k)

    def forward_views(self, views):
        feats = [self.backbone(v) for v in views[:2]]
        q1, q2 = (self.projector(f) for f in feats)
        k1, k2 = self.keys(views[:2])
        t = float(self.cfg.method.temperature)
        queue = self.queue.clone()  # the loss must not see this step's keys, nor be changed by enqueue
        loss = (moco_v2_loss(q1, k2, queue[1], t) + moco_v2_loss(q2, k1, queue[0], t)) / 2
        self.enqueue(torch.stack([gather_no_grad(k1), gather_no_grad(k2)]))
        return {"loss": loss, "feats": feats[0]}


class MoCoV3(_MoCo):
    """MoCo v3: ``ctr(q1, k2) + ctr(q2, k1)``, each scaled by 2T, predictor on the query side only."""

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        # as the reference builds it: no Linear has a bias; ViT: final BN without affine
        self.predictor = mlp(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, layers=2,
                             last_bn=self.is_vit, last_bn_affine=False, last_bias=False)
        t = m.get("temperature", "auto")
        self.temperature = (0.2 if self.is_vit else 1.0) if t in (None, "auto") else float(t)

    def build_projector(self) -> nn.Module:
        m = self.cfg.method  # 2 layers for ResNet, 3 for ViT; final BN without affine parameters
        return mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim, layers=3 if self.is_vit else 2,
                   last_bn=True, last_bn_affine=False)

    def prepare_backbone(self) -> None:
        if not self.is_vit:
            return
        m = self.cfg.method
        if m.get("vit_moco_init", True):
            moco_v3_vit_init(self.backbone)
        if m.get("vit_sincos_pos_embed", True):
            set_sincos_pos_embed(self.backbone)
        if m.get("vit_frozen_patch_embed", True):
            # a fixed random patch projection stabilizes training (vits.py stop_grad_conv1)
            proj = self.backbone.patch_embed.proj
            if not m.get("vit_moco_init", True):  # the projection is xavier-uniform either way, as in vits.py
                _xavier_patch_embed(proj)
            for p in proj.parameters():
                p.requires_grad_(False)

    def forward_views(self, views):
        feats = [self.backbone(v) for v in views[:2]]
        q1, q2 = (self.predictor(self.projector(f)) for f in feats)
        k1, k2 = self.keys(views[:2])
        loss = moco_v3_loss(q1, q2, gather_no_grad(k1), gather_no_grad(k2), self.temperature, rank())
        return {"loss": loss, "feats": feats[0]}
