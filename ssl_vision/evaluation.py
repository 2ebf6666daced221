"""Offline evaluation of a frozen backbone: feature extraction, linear probe and weighted kNN.

The backbone is put in eval mode (BatchNorm statistics frozen) and run without gradient; a
checksum of its weights is compared before and after, so a probe can never train the encoder.
Both probes are deterministic given ``seed``, so re-evaluating a checkpoint reproduces the
numbers of the run that wrote it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .augment import EvalTransform, ProbeCrops
from .distributed import gather_variable


def weights_checksum(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shard(loader):
    """This rank's strided share of a loader's dataset (every sample exactly once over all ranks)."""
    from torch.utils.data import DataLoader, Subset

    from .distributed import rank, world_size

    if world_size() == 1:
        return loader
    subset = Subset(loader.dataset, range(rank(), len(loader.dataset), world_size()))
    return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, transform: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 on CPU and labels (N,) of every sample of ``loader``'s dataset.

    ``transform(images_uint8, sizes, indexes)`` makes the backbone's input (``EvalTransform``, ``ProbeCrops``).

    Under DDP each rank embeds its share; the shares are gathered and put back in dataset order,
    so the result (and every probe on it) is the same for any number of ranks.
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
    f, y, i = (gather_variable(torch.cat(t)).cpu() for t in (feats, labels, indexes))
    order = i.argsort()
    return f[order], y[order]


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 1) -> float:
    metric = MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
    return float(metric(logits, labels))


def linear_probe(train_x, train_y, val_x, val_y, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 weight_decay: float = 5e-4, batch_size: int = 256, seed: int = 0) -> dict:
    """Train a linear classifier on frozen (standardized) features; top-1 / top-5 on validation.

    train_x: (N, D) features, or (C, N, D) features of C augmented copies of the N training images;
    epoch ``e`` then trains on copy ``e % C`` (every image once per epoch, as the standard protocol
    does with fresh random crops). val_x: (M, D).
    """
    g = torch.Generator().manual_seed(seed)
    copies = train_x if train_x.ndim == 3 else train_x[None]
    flat = copies.reshape(-1, copies.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    copies, vx = (copies - mean) / std, (val_x - mean) / std
    n = copies.shape[1]
    head = nn.Linear(copies.shape[-1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        tx = copies[epoch % len(copies)]
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(head(tx[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = head(vx)
    return {"top1": accuracy(logits, val_y, num_classes, 1), "top5": accuracy(logits, val_y, num_classes, 5)}


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
                       epochs=int(lin.epochs), lr=float(lin.lr), weight_decay=float(lin.weight_decay),
                       batch_size=int(lin.batch_size), seed=int(ecfg.seed))
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
    """
    before = weights_checksum(backbone)
    train_loader, val_loader = datamodule.probe_dataloaders(batch_size=int(ecfg.batch_size))
    transform = transform.to(device)
    train_x, train_y = extract_features(backbone, train_loader, transform, device)
    val_x, val_y = extract_features(backbone, val_loader, transform, device)
    lin, linear_x = ecfg.linear, None
    if int(lin.get("augment_copies", 0)) > 0:
        crops = [ProbeCrops(transform, c, int(ecfg.seed), tuple(lin.crop_scale), flip_prob=float(lin.flip_prob))
                 for c in range(int(lin.augment_copies))]
        linear_x = torch.stack([extract_features(backbone, train_loader, t, device)[0] for t in crops])
    if weights_checksum(backbone) != before:
        raise RuntimeError("evaluation changed the backbone's weights or BatchNorm statistics")
    known = train_y >= 0
    metrics = evaluate_features(train_x[known], train_y[known], val_x, val_y, datamodule.num_classes, ecfg,
                                None if linear_x is None else linear_x[:, known])
    return (metrics, (val_x, val_y)) if return_features else metrics


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
