"""Optimizers (SGD, AdamW, LARS) with parameter groups, the warmup-cosine schedule, and the check of
what gradient accumulation changes for a method (``gradient_accumulation_check``)."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update  # torch's functional SGD (fused=True: one kernel)

from .config import ConfigError

log = logging.getLogger("ssl_vision")

OPTIMIZERS = ("sgd", "adamw", "lars")
LARS_TRUST = ("moco_v3", "solo_learn")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), SGD with momentum underneath.

    Every parameter ``w`` with gradient ``g`` in a group without ``lars_exclude`` takes the step
    ``lr * buf`` with ``buf = momentum * buf + s * (g + wd * w)`` and a per-tensor scale ``s``:

    - ``trust="moco_v3"`` (facebookresearch/moco-v3 ``moco/optimizer.py``; facebookresearch/mae
      ``util/lars.py`` is the same code): ``s = eta ||w|| / ||g + wd w||``, 1 if either norm is 0.
    - ``trust="solo_learn"`` (vturrisi/solo-learn ``solo/utils/lars.py``, from Lightning Bolts):
      ``s = eta ||w|| / (||g|| + wd ||w|| + eps)``; if ``||w||`` or ``||g||`` is 0 the raw gradient
      is used, without weight decay.
    - ``clip_lr`` (solo-learn's ``clip_lr``, LARC's clipping): ``s = min(s / lr, 1)``, so the
      step is ``min(s, lr)`` times the update instead of ``lr * s``.

    Groups with ``lars_exclude=True`` (biases, norms, the probe: the references exclude every
    parameter of at most one dimension) take plain SGD steps ``buf = momentum * buf + g + wd * w``.
    ``timm.optim.Lars`` is not used: it has only the solo-learn formula, and it still applies
    weight decay when a norm is 0 and adapts only groups with weight decay unless ``always_adapt``.

    The update runs on whole groups with ``torch._foreach_*`` ops and needs no host sync: a
    constant number of kernel launches per group, plus one multiply per tensor (``s`` is a device
    scalar per tensor; torch's fused lists take host scalars only, which would cost a sync). The
    scaled update is written into ``p.grad`` (no new tensor per weight), and the momentum and weight
    update is torch's fused SGD kernel (``torch.optim.sgd.sgd``, ``fused=True``) with lr and momentum
    only. After a step ``p.grad`` is not the raw gradient (on either path).

    On the CPU (``host_scalars``, default: parameters on the CPU), where reading a value costs no
    sync, ``s`` is a host number per tensor and one fused kernel per tensor does the whole update
    (``s * g`` through its ``grad_scale`` = 1 / s, ``s * wd * w`` through its weight decay), after
    reductions that only read: ``||w||``, ``||g||`` and, for ``moco_v3``, ``<g, w>``, with
    ``||g + wd w||^2 = ||g||^2 + 2 wd <g, w> + wd^2 ||w||^2``. That is 9 passes over the weights'
    memory instead of 12: Barlow Twins' / VICReg's 138 M projector weights make LARS memory-bound.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, trust="moco_v3",
                 clip_lr=False, eps=1e-8, host_scalars: bool | None = None):
        if trust not in LARS_TRUST:
            raise ConfigError(f"optimizer.lars_trust: unknown formula '{trust}'; choose one of: {', '.join(LARS_TRUST)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      trust=trust, clip_lr=bool(clip_lr), eps=eps, lars_exclude=False))
        self.host_scalars = host_scalars

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # optimizer states saved before these options existed
            for key, value in (("trust", "moco_v3"), ("clip_lr", False), ("eps", 1e-8), ("lars_exclude", False)):
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict = {}  # foreach ops need one device and dtype per list
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list) -> None:
        host = self.__dict__.get("host_scalars")  # absent in an optimizer unpickled from an older version
        if params[0].device.type == "cpu" if host is None else host:
            for p in params:
                self._update_one(group, p)
            return
        grads = [p.grad for p in params]
        wd = float(group["weight_decay"])
        scale = None
        if not group["lars_exclude"] and group["trust"] == "solo_learn":  # its trust needs the raw ||g||
            scale = self._scale(group, params, grads)
        # in place: p.grad becomes the update u = s * (g + wd * w) (Lightning zeroes it after the step);
        # a new tensor per parameter would cost a page-faulted allocation of every weight each step
        if wd:
            torch._foreach_add_(grads, params, alpha=wd)
        if not group["lars_exclude"]:
            if scale is None:
                scale = self._scale(group, params, grads)
            torch._foreach_mul_(grads, list(scale.unbind(0)))
        # buf = momentum * buf + u (u itself at a tensor's first step); w -= lr * buf: torch's fused SGD
        # kernel, one pass over w, u and buf (host scalars only: lr and momentum)
        state = [self.state[p] for p in params]
        for first in (False, True):
            idx = [i for i, st in enumerate(state) if ("momentum_buffer" in st) != first]
            if not idx:
                continue
            bufs = [None if first else state[i]["momentum_buffer"] for i in idx]
            sgd_update([params[i] for i in idx], [grads[i] for i in idx], bufs, fused=True,
                       weight_decay=0.0, momentum=float(group["momentum"]), lr=float(group["lr"]),
                       dampening=0.0, nesterov=False, maximize=False)
            for i, buf in zip(idx, bufs):
                if buf is not None:  # None: momentum 0 keeps no buffer
                    state[i]["momentum_buffer"] = buf

    def _update_one(self, group: dict, p: torch.Tensor) -> None:
        """One tensor with a host ``s`` (see the class docstring): ``buf = momentum * buf + s * (g + wd * w)``,
        ``w -= lr * buf`` in one fused kernel."""
        g, wd, state = p.grad, float(group["weight_decay"]), self.state[p]
        s = 1.0 if group["lars_exclude"] else self._host_scale(group, p, g)
        bufs = [state.get("momentum_buffer")]
        inverse = None if s == 1.0 else torch.tensor(1.0 / s if s else math.inf)  # the kernel divides g by it
        sgd_update([p], [g], bufs, fused=True, grad_scale=inverse, weight_decay=s * wd,
                   momentum=float(group["momentum"]), lr=float(group["lr"]), dampening=0.0, nesterov=False,
                   maximize=False)
        if bufs[0] is not None:  # None: momentum 0 keeps no buffer
            state["momentum_buffer"] = bufs[0]

    @staticmethod
    def _host_scale(group: dict, w: torch.Tensor, g: torch.Tensor) -> float:
        """``_scale`` for one tensor as a host number, from reductions that only read ``w`` and ``g``."""
        wd, eta, lr = float(group["weight_decay"]), float(group["eta"]), float(group["lr"])
        w_norm, g_norm = float(torch.linalg.vector_norm(w)), float(torch.linalg.vector_norm(g))
        if group["trust"] == "moco_v3":
            gw = float(torch.dot(g.reshape(-1), w.reshape(-1))) if wd else 0.0
            u_norm = math.sqrt(max(g_norm ** 2 + 2 * wd * gw + (wd * w_norm) ** 2, 0.0))
            if not (w_norm > 0 and u_norm > 0):
                return 1.0
            scale = eta * w_norm / u_norm
        else:
            if not (w_norm > 0 and g_norm > 0):  # the raw gradient (factor 1 as w = 0), or nothing (g = 0)
                return 1.0 if w_norm == 0 else 0.0
            scale = eta * w_norm / (g_norm + w_norm * wd + float(group["eps"]))
        return min(scale / lr, 1.0) if group["clip_lr"] else scale

    @staticmethod
    def _scale(group: dict, params: list, grads: list) -> torch.Tensor:
        """Per-tensor factor (N,) that multiplies ``update = g + wd * w`` (see the class docstring); ``grads``:
        the update ``g + wd * w`` for ``trust="moco_v3"``, the raw gradient ``g`` for ``"solo_learn"``."""
        wd, eta = float(group["weight_decay"]), float(group["eta"])
        w_norm = torch.stack(torch._foreach_norm(params))
        if group["trust"] == "moco_v3":
            u_norm = torch.stack(torch._foreach_norm(grads))
            scale = eta * w_norm / u_norm
            if group["clip_lr"]:
                scale = torch.clamp(scale / group["lr"], max=1.0)
            return torch.where((w_norm > 0) & (u_norm > 0), scale, torch.ones_like(scale))
        g_norm = torch.stack(torch._foreach_norm(grads))
        valid = (w_norm > 0) & (g_norm > 0)
        scale = eta * w_norm / (g_norm + w_norm * wd + group["eps"])
        if group["clip_lr"]:
            scale = torch.clamp(scale / group["lr"], max=1.0)
        # invalid: the raw gradient. ||w|| = 0 makes wd * w = 0, so factor 1; ||g|| = 0 with w != 0
        # must drop wd * w, and g = 0, so factor 0
        return torch.where(valid, scale, (w_norm == 0).to(scale.dtype))


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


def fused(groups: list[dict]) -> bool | None:
    """torch's fused SGD / AdamW kernels (one pass over weight, gradient and state per step, where the
    default for-each implementation makes several; the CPU's default is a per-tensor loop) when every
    parameter is a floating-point tensor on a device that has them; None: torch's default."""
    params = [p for g in groups for p in g["params"]]
    ok = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return True if params and ok else None


def build_optimizer(ocfg, groups: list[dict]) -> torch.optim.Optimizer:
    """``groups``: dicts with ``params``, ``lr``, ``weight_decay`` and optionally ``lars_exclude``."""
    name = ocfg.name
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=ocfg.get("momentum", 0.9), fused=fused(groups))
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(ocfg.get("betas", (0.9, 0.999))),
                                 fused=fused(groups))
    if name == "lars":
        return LARS(groups, lr=groups[0]["lr"], momentum=ocfg.get("momentum", 0.9), eta=ocfg.get("eta", 0.001),
                    trust=ocfg.get("lars_trust", "moco_v3"), clip_lr=bool(ocfg.get("clip_lr", False)))
    raise ConfigError(f"optimizer.name: unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# What a method's loss takes from the batch beyond per-sample terms: with gradient accumulation it
# sees one micro-batch (data.batch_size per device) at a time, while the lr scaling counts the
# accumulated global batch. ``None``: nothing (a ResNet backbone's BatchNorm statistics aside).
BATCH_COUPLING = {
    "simclr": "its negatives (2B - 2 per sample, from the micro-batch instead of the accumulated batch) and the "
              "BatchNorm statistics of its projector",
    "moco_v3": "its negatives (the keys of the micro-batch) and the BatchNorm statistics of projector and predictor",
    "moco_v2": None,  # the queue keeps its negatives (it is filled every micro-batch); no BatchNorm in the head
    "mae": None,      # per-sample loss
    "byol": "the BatchNorm statistics of its projector and predictor (and of the target's projector)",
    "simsiam": "the BatchNorm statistics of its projector (the last one, without affine, included) and predictor",
    "barlow_twins": "the per-dimension standardization and the cross-correlation matrix of its embeddings "
                    "(the global batch of all ranks, here one micro-batch's) and the BatchNorm statistics of its "
                    "projector",
    "vicreg": "the variance and covariance terms of its embeddings (the global batch of all ranks, here one "
              "micro-batch's) and the BatchNorm statistics of its expander",
    "dino": "the centre of the teacher outputs (updated with momentum from each micro-batch's mean instead of once "
            "from the accumulated batch's) and, with method.use_bn_in_head, the BatchNorm statistics of its head",
}


def gradient_accumulation_check(cfg, accumulate: int) -> list[str]:
    """Say what gradient accumulation changes for this run; refuse it where a recipe would silently
    differ from its reference.

    Logs and returns the warnings (one line each; empty when nothing changes). Raises ``ConfigError``
    when ``cfg.recipe`` (set by the ``conf/experiment`` recipes) is strict and the loss depends on the
    batch (``BATCH_COUPLING``, or a ResNet's BatchNorm) at an accumulation the reference does not use
    (``recipe.accumulate_grad_batches``, default 1). Call it before the Trainer starts.
    """
    accumulate = int(accumulate or 1)
    recipe = cfg.get("recipe") or {}
    if accumulate <= 1 or accumulate == int(recipe.get("accumulate_grad_batches", 1)):
        return []
    method = cfg.method.name
    known = method in BATCH_COUPLING
    parts = [BATCH_COUPLING[method]] if known else ["whatever batch statistics its loss uses"]
    if not str(cfg.backbone.name).startswith(("vit", "deit")):
        parts.append("the BatchNorm statistics of the backbone")
    parts = [x for x in parts if x]
    if not parts:
        return []
    message = (f"trainer.accumulate_grad_batches={accumulate}: {method} then sees micro-batches of "
               f"{int(cfg.data.batch_size)} per device for {' and '.join(parts)}, while the learning rate is "
               f"scaled for the accumulated batch"
               + ("" if known else f" (method '{method}' is not in ssl_vision.optim.BATCH_COUPLING: check it)"))
    if recipe and recipe.get("strict", True) and known:
        raise ConfigError(
            f"{message}; recipe '{recipe.get('name', '?')}' follows {recipe.get('reference', 'its reference')}, "
            f"which trains on the whole batch: raise data.batch_size (or the number of devices) instead, or set "
            f"recipe.strict=false to accept the difference")
    log.warning("%s", message)
    return [message]


def check_optimizer_config(ocfg) -> None:
    if ocfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer '{ocfg.name}'; choose one of: {', '.join(OPTIMIZERS)}")
    if not ocfg.lr > 0:
        raise ConfigError(f"optimizer.lr: must be a positive number, got {ocfg.lr}")
    if ocfg.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay: must be >= 0, got {ocfg.weight_decay}")
    trust = ocfg.get("lars_trust", "moco_v3")
    if trust not in LARS_TRUST:
        raise ConfigError(f"optimizer.lars_trust: unknown formula '{trust}'; choose one of: {', '.join(LARS_TRUST)}")
    if ocfg.get("clip_lr", False) not in (True, False):
        raise ConfigError(f"optimizer.clip_lr: must be true or false, got {ocfg.clip_lr}")
