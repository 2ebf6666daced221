"""Offline evaluation of a frozen backbone: feature extraction, linear probe and weighted kNN.

The backbone is put in eval mode (BatchNorm statistics frozen) and run without gradient; a
checksum of its weights is compared before and after, so a probe can never train the encoder.
Both probes are deterministic given ``seed``, so re-evaluating a checkpoint reproduces the
numbers of the run that wrote it.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .augment import EvalTransform, ProbeCrops
from .distributed import broadcast_object, broadcast_tensors_, gather_to, rank, world_size


def weights_checksum(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shard(loader):
    """This rank's strided share of a loader's dataset (every sample exactly once over all ranks)."""
    from torch.utils.data import DataLoader, Subset

    if world_size() == 1:
        return loader
    subset = Subset(loader.dataset, range(rank(), len(loader.dataset), world_size()))
    return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, transform: nn.Module, device
                     ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Features (N, D) float32 on CPU and labels (N,) of every sample of ``loader``'s dataset.

    ``transform(images_uint8, sizes, indexes)`` makes the backbone's input (``EvalTransform``, ``ProbeCrops``).

    Under DDP (called on every rank) each rank embeds its share, so every sample is embedded exactly
    once; the shares are gathered on rank 0 alone and put back in dataset order there, so the result
    (and every probe on it) is the same for any number of ranks. The other ranks get ``(None, None)``:
    only one process holds the feature matrix.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels, indexes = [], [], []
    try:
        for images, sizes, y, idx in shard(loader):
            x = transform(images.to(device, non_blocking=True), sizes.to(device), idx)
            feats.append(backbone(x).float())
            labels.append(y.to(device))
            indexes.append(idx.to(device))
    finally:
        backbone.train(was_training)
    f, y, i = (gather_to(torch.cat(t), dst=0) for t in (feats, labels, indexes))
    if f is None:
        return None, None
    order = i.cpu().argsort()
    return f.cpu()[order], y.cpu()[order]


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 1) -> float:
    metric = MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
    return float(metric(logits, labels))


PROBE_OPTIMIZERS = ("sgd", "lars")
PROBE_SCHEDULES = ("cosine", "step")
PROBE_INTERVALS = ("step", "epoch")
PROBE_NORMS = ("standardize", "batchnorm", "none")


def probe_lr_schedule(base_lr: float, epochs: int, steps_per_epoch: int, schedule: str = "cosine",
                      interval: str = "step", warmup_epochs: float = 0.0, milestones=(60, 80),
                      gamma: float = 0.1) -> list[float]:
    """The learning rate of every step of the linear probe, from the (fractional) epoch ``t`` at
    that step (``interval=step``; ``epoch``: the lr changes at epoch boundaries only):

    - linear warm-up ``lr * t / warmup_epochs`` (facebookresearch/mae util/lr_sched.py, per step),
    - ``cosine``: ``lr * (1 + cos(pi * (t - warmup) / (epochs - warmup))) / 2`` (MAE per step;
      moco-v3 main_lincls.py ``adjust_learning_rate`` per epoch),
    - ``step``: ``lr * gamma ** (number of milestones <= t)`` (solo-learn's MultiStepLR, per epoch).
    """
    lrs = []
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            t = epoch + i / steps_per_epoch if interval == "step" else float(epoch)
            if t < warmup_epochs:
                lr = base_lr * t / warmup_epochs
            elif schedule == "cosine":
                lr = base_lr * 0.5 * (1 + math.cos(math.pi * (t - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)))
            else:
                lr = base_lr * gamma ** sum(t >= m for m in milestones)
            lrs.append(lr)
    return lrs


def probe_head(dim: int, num_classes: int, norm: str, init_std: float | None, generator) -> nn.Module:
    """The probe's classifier: ``batchnorm``: BatchNorm without affine (eps 1e-6), then Linear (MAE
    main_linprobe.py); otherwise a Linear. Weights N(0, init_std) and zero bias (moco-v3
    main_lincls.py, MAE), or with ``init_std=None`` nn.Linear's default uniform init (solo-learn)."""
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        if init_std is None:
            bound = 1 / math.sqrt(dim)
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        else:
            linear.weight.normal_(0, float(init_std), generator=generator)
            linear.bias.zero_()
    if norm == "batchnorm":
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
    return nn.Sequential(linear)


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        from .config import ConfigError

        raise ConfigError(f"eval.linear.{key}: unknown value '{value}'; choose one of: {', '.join(choices)}")


def linear_probe(train_x, train_y, val_x, val_y, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 weight_decay: float = 5e-4, batch_size: int = 256, seed: int = 0, *, optimizer: str = "sgd",
                 momentum: float = 0.9, scale_lr: bool = False, schedule: str = "cosine", interval: str = "step",
                 warmup_epochs: float = 0.0, milestones=(60, 80), gamma: float = 0.1, norm: str = "standardize",
                 init_std: float | None = 0.01, eta: float = 0.001, lars_trust: str = "moco_v3",
                 drop_last: bool = False) -> dict:
    """Train a linear classifier on frozen features; top-1 / top-5 on validation.

    train_x: (N, D) features, or (C, N, D) features of C augmented copies of the N training images;
    epoch ``e`` then trains on copy ``e % C`` (every image once per epoch, as the standard protocol
    does with fresh random crops). val_x: (M, D).

    The protocol (the ``conf/eval`` presets set it as each reference does): ``optimizer`` SGD or
    LARS (``eta``, ``lars_trust``; biases excluded, as MAE's util/lars.py), base ``lr`` (times
    ``batch_size / 256`` with ``scale_lr``), ``weight_decay``, ``momentum``, ``schedule`` /
    ``interval`` / ``warmup_epochs`` / ``milestones`` / ``gamma`` (see ``probe_lr_schedule``), and
    the features' normalisation ``norm``: ``standardize`` (mean / std of the training features,
    fixed), ``batchnorm`` (BatchNorm without affine in the head, batch statistics while training,
    running ones for validation) or ``none``. ``drop_last``: skip each epoch's incomplete last batch
    (the loaders of MAE and solo-learn do; a batch of one sample is always skipped under ``batchnorm``).
    """
    _check_choice("optimizer", optimizer, PROBE_OPTIMIZERS)
    _check_choice("schedule", schedule, PROBE_SCHEDULES)
    _check_choice("interval", interval, PROBE_INTERVALS)
    _check_choice("norm", norm, PROBE_NORMS)
    g = torch.Generator().manual_seed(seed)
    copies = train_x if train_x.ndim == 3 else train_x[None]
    vx = val_x
    if norm == "standardize":
        flat = copies.reshape(-1, copies.shape[-1])
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        copies, vx = (copies - mean) / std, (val_x - mean) / std
    n = copies.shape[1]
    head = probe_head(copies.shape[-1], num_classes, norm, init_std, g)
    linear = head[-1]
    base_lr = lr * batch_size / 256 if scale_lr else lr
    if optimizer == "lars":
        from .optim import LARS

        opt = LARS([{"params": [linear.weight], "weight_decay": weight_decay},
                    {"params": [linear.bias], "weight_decay": 0.0, "lars_exclude": True}],
                   lr=base_lr, momentum=momentum, eta=eta, trust=lars_trust)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = n // batch_size if drop_last and n >= batch_size else max(1, -(-n // batch_size))
    if norm == "batchnorm" and steps_per_epoch > 1 and n - (steps_per_epoch - 1) * batch_size == 1:
        steps_per_epoch -= 1  # BatchNorm cannot train on a single sample
    lrs = probe_lr_schedule(base_lr, epochs, steps_per_epoch, schedule, interval, warmup_epochs, milestones, gamma)
    head.train()
    step = 0
    for epoch in range(epochs):
        tx = copies[epoch % len(copies)]
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lrs[step]
            loss = F.cross_entropy(head(tx[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        logits = head(vx)
    return {"top1": accuracy(logits, val_y, num_classes, 1), "top5": accuracy(logits, val_y, num_classes, 5)}


def linear_probe_options(lin) -> dict:
    """``linear_probe``'s keyword arguments from ``eval.linear`` (keys missing in older configs: defaults)."""
    init_std = lin.get("init_std", 0.01)
    return dict(
        epochs=int(lin.epochs), lr=float(lin.lr), weight_decay=float(lin.weight_decay),
        batch_size=int(lin.batch_size), optimizer=str(lin.get("optimizer", "sgd")),
        momentum=float(lin.get("momentum", 0.9)), scale_lr=bool(lin.get("scale_lr", False)),
        schedule=str(lin.get("schedule", "cosine")), interval=str(lin.get("interval", "step")),
        warmup_epochs=float(lin.get("warmup_epochs", 0.0)), milestones=tuple(lin.get("milestones", (60, 80))),
        gamma=float(lin.get("gamma", 0.1)), norm=str(lin.get("norm", "standardize")),
        init_std=None if init_std is None else float(init_std), eta=float(lin.get("eta", 0.001)),
        lars_trust=str(lin.get("lars_trust", "moco_v3")), drop_last=bool(lin.get("drop_last", False)),
    )


@torch.no_grad()
def knn_scores(train_x, train_y, val_x, num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, votes weighted by exp(sim / T)."""
    tx, vx = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    k = min(k, len(tx))
    out = []
    for i in range(0, len(vx), chunk):
        sim = vx[i : i + chunk] @ tx.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def evaluate_features(train_x, train_y, val_x, val_y, num_classes: int, ecfg, linear_x=None) -> dict:
    """Linear probe and kNN metrics from extracted features, keyed as in ``summary.json``.

    train_x (N, D): center-crop features, the kNN's memory bank; the linear head trains on
    ``linear_x`` (C, N, D), the features of C augmented copies, when given, else on ``train_x``.
    """
    lin = ecfg.linear
    res = linear_probe(train_x if linear_x is None else linear_x, train_y, val_x, val_y, num_classes,
                       seed=int(ecfg.seed), **linear_probe_options(lin))
    out = {"linear_probe_top1": res["top1"], "linear_probe_top5": res["top5"]}
    for k in ecfg.knn.k:
        scores = knn_scores(train_x, train_y, val_x, num_classes, int(k), float(ecfg.knn.temperature))
        key = "knn_top1" if int(k) == int(ecfg.knn.k[0]) else f"knn{int(k)}_top1"
        out[key] = accuracy(scores, val_y, num_classes, 1)
    return out


def evaluate_backbone(backbone: nn.Module, datamodule, transform: EvalTransform, ecfg, device="cpu",
                      return_features: bool = False):
    """Extract features with the frozen backbone and run both probes: the metrics dict, or with
    ``return_features`` ``(metrics, (val_x (N, D), val_y (N,)))`` (CPU tensors, e.g. for plots).

    Validation and the kNN bank use center crops (``transform``); the linear head trains on
    ``eval.linear.augment_copies`` fixed random crops of each training image (``ProbeCrops``), or on
    the center crops when that is 0.

    Under DDP every rank calls it once the process group exists: the backbone takes rank 0's buffers
    (BatchNorm statistics, which ranks without SyncBatchNorm keep apart; rank 0's are the checkpoint's),
    each rank embeds its share of every set (``extract_features``), rank 0 alone holds the features and
    runs the probes, and every rank returns rank 0's metrics (the features: ``None`` on the others).
    The other ranks wait for rank 0's probes in that broadcast, within the process group's timeout.
    """
    broadcast_tensors_(list(backbone.buffers()), src=0)
    before = weights_checksum(backbone)
    train_loader, val_loader = datamodule.probe_dataloaders(batch_size=int(ecfg.batch_size))
    transform = transform.to(device)
    train_x, train_y = extract_features(backbone, train_loader, transform, device)
    val_x, val_y = extract_features(backbone, val_loader, transform, device)
    lin, linear_x = ecfg.linear, None
    if int(lin.get("augment_copies", 0)) > 0:
        crops = [ProbeCrops(transform, c, int(ecfg.seed), tuple(lin.crop_scale), flip_prob=float(lin.flip_prob))
                 for c in range(int(lin.augment_copies))]
        copies = [extract_features(backbone, train_loader, t, device)[0] for t in crops]
        linear_x = torch.stack(copies) if rank() == 0 else None
    if weights_checksum(backbone) != before:
        raise RuntimeError("evaluation changed the backbone's weights or BatchNorm statistics")
    metrics = None
    if rank() == 0:
        known = train_y >= 0
        metrics = evaluate_features(train_x[known], train_y[known], val_x, val_y, datamodule.num_classes, ecfg,
                                    None if linear_x is None else linear_x[:, known])
    metrics = broadcast_object(metrics, src=0)
    return (metrics, (val_x, val_y) if val_x is not None else None) if return_features else metrics


def load_checkpoint(path) -> dict:
    """Read a Lightning checkpoint written by ssl-vision (tensors and plain containers only)."""
    from pathlib import Path

    from .config import ConfigError

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"checkpoint: '{p}' does not exist; pass checkpoint=<run dir>/checkpoints/last.ckpt")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    if "cfg" not in ckpt.get("hyper_parameters", {}):
        raise ConfigError(f"checkpoint: '{p}' was not written by ssl-vision-train (no config inside)")
    return ckpt


def backbone_from_checkpoint(ckpt: dict) -> tuple[nn.Module, int]:
    """Rebuild the pre-trained backbone of a checkpoint from its stored config and weights."""
    from .backbones import backbone_from_config

    cfg = ckpt["hyper_parameters"]["cfg"]
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg)
    backbone, dim = backbone_from_config(cfg.backbone, int(cfg.data.image_size))
    state = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)
    return backbone, dim
