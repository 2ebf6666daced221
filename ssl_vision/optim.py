"""Optimizers (SGD, AdamW, LARS) with parameter groups, and the warmup-cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError

OPTIMIZERS = ("sgd", "adamw", "lars")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as used by SimCLR.

    Parameters in a group with ``lars_exclude=True`` (biases, norms, the probe) are updated by
    plain SGD with momentum and without weight decay adaptation.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      eps=eps, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    p_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(g)
                    trust = torch.where((p_norm > 0) & (g_norm > 0),
                                        group["eta"] * p_norm / (g_norm + group["eps"]), torch.ones_like(p_norm))
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def split_decay(module: nn.Module, exclude_bias_norm: bool) -> tuple[list, list]:
    """(decay, no_decay) parameters: biases and norm weights (ndim <= 1) go to no_decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_norm and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    return decay, no_decay


def scaled_lr(base_lr: float, global_batch: int, scale: bool = True) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256 if scale else base_lr


def build_optimizer(ocfg, groups: list[dict]) -> torch.optim.Optimizer:
    """``groups``: dicts with ``params``, ``lr``, ``weight_decay`` and optionally ``lars_exclude``."""
    name = ocfg.name
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=ocfg.get("momentum", 0.9))
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(ocfg.get("betas", (0.9, 0.999))))
    if name == "lars":
        return LARS(groups, lr=groups[0]["lr"], momentum=ocfg.get("momentum", 0.9), eta=ocfg.get("eta", 0.001))
    raise ConfigError(f"optimizer.name: unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_optimizer_config(ocfg) -> None:
    if ocfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer '{ocfg.name}'; choose one of: {', '.join(OPTIMIZERS)}")
    if not ocfg.lr > 0:
        raise ConfigError(f"optimizer.lr: must be a positive number, got {ocfg.lr}")
    if ocfg.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay: must be >= 0, got {ocfg.weight_decay}")
