"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers";
facebookresearch/dino main_dino.py, vision_transformer.py ``DINOHead``, utils.py).

A student (backbone + DINO head) sees every view, global views first, then the local ones; an EMA
teacher (the base class's ``momentum_copy``, cosine momentum from ``method.momentum`` to 1) sees the
``augment.num_global`` global views only. The loss (``dino_loss``) is the cross-entropy between the
teacher's centred, sharpened softmax and the student's softmax over pairs of different views. The
centre follows the teacher outputs of the whole batch (summed over ranks) with momentum; the teacher
temperature warms up linearly per epoch; the head's last layer is frozen during the first
``method.freeze_last_layer`` epochs; per-parameter gradient clipping and the cosine weight-decay
schedule are the reference's. The TEACHER backbone is ``self.backbone``, so it is the network that the
probes evaluate and that export writes, as the paper reports; the student's is ``student_backbone``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..config import ConfigError
from ..distributed import gather_no_grad, world_size
from ..losses import dino_loss
from .base import SSLMethod


class WeightNormLinear(nn.Module):
    """Linear without bias, weight ``g * v / ||v||`` per output row (``nn.utils.weight_norm``, dim 0), with
    ``weight_g`` (out, 1) set to 1; deep-copyable, unlike torch's hook-based weight norm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """MLP (``layers`` Linear, GELU between, optional BN) to a bottleneck, L2-normalized, then the
    weight-normalized last layer; with ``norm_last_layer`` its norms ``weight_g`` stay fixed at 1."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(layers, 1) - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods += [nn.BatchNorm1d(dims[i + 1])] * use_bn + [nn.GELU()]
        self.mlp = nn.Sequential(*mods)
        for mod in self.mlp.modules():
            if isinstance(mod, nn.Linear):  # DINOHead._init_weights
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """``np.linspace(warmup_temp, temp, warmup_epochs)[epoch]`` during the warm-up, ``temp`` after it."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(1, warmup_epochs - 1)


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """utils.cosine_scheduler without warm-up: ``start`` at step 0 to ``end`` at ``total``."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def multicrop(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Features of all views, one backbone call per run of consecutive views of one size (utils.MultiCropWrapper)."""
    return torch.cat([backbone(torch.cat(list(run))) for _, run in itertools.groupby(views, lambda v: v.shape[-2:])])


class DINO(SSLMethod):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m, d = self.cfg.method, self.cfg.data
        if self.augment.num_global != 2:  # the reference's teacher output is chunked into 2 global views
            raise ConfigError(f"augment.views: DINO's teacher takes 2 global views (size = data.image_size "
                              f"{d.image_size}), got {self.augment.num_global} of {self.augment.names}; give the "
                              "local views a smaller size, e.g. augment.views.local1.size=16")
        if self.is_vit and min(self.augment.sizes) < int(d.image_size) and not self.backbone.dynamic_img_size:
            raise ConfigError("backbone.kwargs.dynamic_img_size: a ViT sees DINO's smaller local views only with an "
                              "interpolated position embedding; add +backbone.kwargs.dynamic_img_size=true")
        self.head = DINOHead(self.feat_dim, int(m.out_dim), int(m.hidden_dim), int(m.bottleneck_dim),
                             int(m.head_layers), bool(m.use_bn_in_head), bool(m.norm_last_layer))
        teacher = self.momentum_copy(self.backbone)
        self.teacher_head = self.momentum_copy(self.head)
        for mod in teacher.modules():  # the reference builds its teacher without stochastic depth
            if isinstance(mod, DropPath):
                mod.drop_prob = 0.0
        self.student_backbone, self.backbone = self.backbone, teacher  # evaluate / export the teacher
        self.register_buffer("center", torch.zeros(1, int(m.out_dim)))

    def forward_views(self, views):
        m, g, b = self.cfg.method, self.augment.num_global, views[0].shape[0]
        bottleneck = self.head.bottleneck(multicrop(self.student_backbone, views))
        student = self.head.last_layer(bottleneck).view(len(views), b, -1)
        with torch.no_grad():
            teacher_feats = multicrop(self.backbone, views[:g])
            teacher = self.teacher_head(teacher_feats).view(g, b, -1)
        temp = teacher_temperature(self.current_epoch, float(m.warmup_teacher_temp), float(m.teacher_temp),
                                   int(m.warmup_teacher_temp_epochs))
        loss = dino_loss(student, teacher, self.center, float(m.student_temp), temp)
        self.update_center(teacher)
        if self._trainer is not None:
            self.log("train/teacher_temp", temp, on_step=False, on_epoch=True)
        return {"loss": loss, "feats": teacher_feats[:b], "embedding": bottleneck[:b]}

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """EMA of the mean teacher output over the global batch: its sum is summed over ranks (all-reduce)."""
        total = gather_no_grad(teacher.float().sum(dim=(0, 1))[None]).sum(dim=0, keepdim=True)
        mean = total / (teacher.shape[0] * teacher.shape[1] * world_size())
        mom = float(self.cfg.method.center_momentum)
        self.center.mul_(mom).add_(mean, alpha=1 - mom)

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        end = self.cfg.method.get("weight_decay_end")
        if end is None:
            return
        wd = cosine_schedule(self.global_step, int(self.trainer.estimated_stepping_batches),
                             float(self.cfg.optimizer.weight_decay), float(end))
        for group in self.trainer.optimizers[0].param_groups:
            if group.get("name") == "decay":  # the reference regularizes its first group only
                group["weight_decay"] = wd

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        clip = float(self.cfg.method.clip_grad)
        student = list(self.student_backbone.parameters()) + list(self.head.parameters())
        grads = [p.grad for p in student if p.grad is not None]
        if clip > 0 and grads:  # utils.clip_gradients: each parameter's gradient norm on its own
            factors = torch.clamp(clip / (torch.stack(torch._foreach_norm(grads)) + 1e-6), max=1.0)
            torch._foreach_mul_(grads, list(factors.unbind(0)))
        if self.current_epoch < int(self.cfg.method.freeze_last_layer):  # utils.cancel_gradients_last_layer
            for p in self.head.last_layer.parameters():
                p.grad = None

    def network_floor(self, views: list[torch.Tensor]) -> None:
        """tools/bench.py's floor: student backbone + head forward + backward on every view, teacher forward on the globals."""
        self.head(multicrop(self.student_backbone, views)).float().sum().backward()
        with torch.no_grad():
            self.teacher_head(multicrop(self.backbone, views[:self.augment.num_global]))
