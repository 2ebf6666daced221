"""Offline evaluation of a frozen backbone: feature extraction, linear probe and weighted kNN.

The backbone is put in eval mode (BatchNorm statistics frozen) and run without gradient; a
checksum of its weights is compared before and after, so a probe can never train the encoder.
Both probes are deterministic given ``seed``, so re-evaluating a checkpoint reproduces the
numbers of the run that wrote it.

Everything runs on the given device (the Trainer's: a GPU when there is one), with bounded memory:
the extracted features live once in the host memory of rank 0 (``eval.feature_memory_gb`` caps
them, see ``augment_copies``) and go to the device ``eval.chunk_mb`` MiB at a time, for the linear
probe's batches, the standardization statistics and the kNN's similarity search alike.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .augment import EvalTransform, ProbeCrops
from .distributed import broadcast_object, broadcast_tensors_, gather_no_grad, gather_to, rank, world_size

MIB = 2**20
GB = 10**9
DEFAULT_CHUNK_MB = 512  # eval.chunk_mb: device memory of one streamed block of features (or similarities)
AUTO_COPIES = 4         # eval.linear.augment_copies=auto: at most this many augmented copies


def _rows_per_chunk(chunk_mb: float, row_bytes: int, multiple: int = 1) -> int:
    """Rows of ``row_bytes`` bytes in ``chunk_mb`` MiB (at least one), a multiple of ``multiple``."""
    rows = max(1, int(chunk_mb * MIB) // max(1, int(row_bytes)))
    return max(multiple, rows // multiple * multiple)


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
def extract_features(backbone: nn.Module, loader, transform: nn.Module, device, chunk_mb: float = DEFAULT_CHUNK_MB
                     ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Features (N, D) float32 on the CPU and labels (N,) of every sample of ``loader``'s dataset.

    ``transform(images_uint8, sizes, indexes)`` makes the backbone's input (``EvalTransform``, ``ProbeCrops``).

    The backbone runs on ``device``; its outputs leave the device every ``chunk_mb`` MiB, so the device
    never holds more than one chunk of features, and the host holds each feature once (rows are written
    into one preallocated matrix, not concatenated at the end).

    Under DDP (called on every rank) each rank embeds its share, so every sample is embedded exactly
    once; the shares are gathered on rank 0 alone, chunk by chunk through ``device`` (NCCL gathers need
    device tensors), and written straight to their dataset positions there, so the result (and every
    probe on it) is the same for any number of ranks. The other ranks get ``(None, None)``: only one
    process holds the feature matrix.
    """
    was_training = backbone.training
    backbone.eval()
    part = shard(loader)
    rows = _HostRows(len(part.dataset) if hasattr(part, "dataset") else None)
    labels, indexes, pending, pending_bytes = [], [], [], 0
    limit = chunk_mb * MIB
    try:
        for images, sizes, y, idx in part:
            x = transform(images.to(device, non_blocking=True), sizes.to(device), idx)
            f = backbone(x).float()
            pending.append(f)
            pending_bytes += f.numel() * 4
            labels.append(y.cpu())
            indexes.append(idx.cpu())
            if pending_bytes >= limit:  # one device-to-host copy per chunk
                rows.append(torch.cat(pending).cpu())
                pending, pending_bytes = [], 0
        if pending:
            rows.append(torch.cat(pending).cpu())
    finally:
        backbone.train(was_training)
    x = rows.result()
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    i = torch.cat(indexes) if indexes else torch.zeros(0, dtype=torch.long)
    if world_size() > 1:
        return _gather_rows(x, y, i, dst=0, device=device, chunk_mb=chunk_mb)
    if len(i) > 1 and not bool((i[1:] > i[:-1]).all()):  # a loader in another order: put rows in dataset order
        order = i.argsort()
        x, y = x[order], y[order]
    return x, y


class _HostRows:
    """Rows appended into one host matrix, preallocated when the number of rows is known (no second copy)."""

    def __init__(self, capacity: int | None):
        self.capacity, self.filled, self.data, self.parts = capacity, 0, None, []

    def append(self, block: torch.Tensor) -> None:
        if self.capacity is None:
            self.parts.append(block)
            return
        if self.data is None:
            self.data = torch.empty((self.capacity, *block.shape[1:]), dtype=block.dtype)
        self.data[self.filled:self.filled + len(block)] = block
        self.filled += len(block)

    def result(self) -> torch.Tensor:
        if self.capacity is None:
            return torch.cat(self.parts) if self.parts else torch.zeros(0, 0)
        if self.data is None:
            return torch.zeros(0, 0)
        return self.data if self.filled == self.capacity else self.data[: self.filled]  # fewer: unreadable files


def _gather_rows(x: torch.Tensor, y: torch.Tensor, i: torch.Tensor, dst: int, device, chunk_mb: float):
    """Every rank's rows ``x`` (n_r, D) with labels ``y`` and dataset indexes ``i``, on rank ``dst`` only, in
    dataset order: (N, D), (N,) on ``dst``; (None, None) elsewhere. Every rank takes part in every call."""
    meta = gather_no_grad(torch.tensor([[len(x), x.shape[1] if x.ndim == 2 else 0]], device=device)).cpu()
    sizes, dim = meta[:, 0].tolist(), int(meta[:, 1].max())
    if x.ndim != 2 or x.shape[1] != dim:  # a rank without a single row
        x = torch.zeros(0, dim)
    all_i = gather_to(i.to(device), dst)
    all_y = gather_to(y.to(device), dst)
    out = pos = None
    if rank() == dst:
        all_i, all_y = all_i.cpu(), all_y.cpu()
        order = all_i.argsort()
        pos = torch.empty_like(order)
        pos[order] = torch.arange(len(order))  # gathered row -> its place in dataset order
        out = torch.empty((len(order), dim))
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
    step = _rows_per_chunk(chunk_mb / len(sizes), 4 * max(dim, 1))  # dst receives one chunk_mb per round
    for start in range(0, max(sizes), step):
        got = gather_to(x[start:start + step].to(device), dst)
        if out is not None:
            src = torch.cat([torch.arange(offsets[r] + min(start, s), offsets[r] + min(start + step, s))
                             for r, s in enumerate(sizes)])
            out[pos[src]] = got.cpu()
    if out is None:
        return None, None
    return out, all_y[order]


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


def _accuracy_metric(num_classes: int, k: int, device) -> MulticlassAccuracy:
    """Top-k accuracy accumulated over chunks on ``device``. ``sync_on_compute=False``: the probes run on rank 0
    alone, and a torchmetrics compute would otherwise wait for the other ranks under DDP."""
    return MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro", sync_on_compute=False,
                              validate_args=False).to(device)


def _copies(train_x) -> list[torch.Tensor]:
    """The training copies as a list of (N, D) matrices: (N, D) -> one; (C, N, D) or a list -> C."""
    if isinstance(train_x, (list, tuple)):
        return list(train_x)
    return list(train_x) if train_x.ndim == 3 else [train_x]


def _rows(x: torch.Tensor, idx: torch.Tensor | None, device: torch.device, start: int = 0, stop: int | None = None
          ) -> torch.Tensor:
    """Rows ``idx`` (or ``start:stop``) of ``x`` on ``device``: gathered where ``x`` lives, then one copy."""
    block = x[start:stop] if idx is None else x.index_select(0, idx.to(x.device))
    return block.to(device, non_blocking=False).float()


@torch.no_grad()
def feature_moments(copies, device="cpu", chunk_mb: float = DEFAULT_CHUNK_MB) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) standard deviation, clamped at 1e-6, of every row of ``copies`` (a list of (N, D)),
    streamed in chunks with float64 sums; float32 (D,) on ``device``. The same values as ``torch.mean`` and
    ``torch.std`` of the stacked rows, without stacking them."""
    device = torch.device(device)
    where = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
    dim = copies[0].shape[1]
    total = torch.zeros(dim, dtype=torch.float64, device=where)
    squares = torch.zeros(dim, dtype=torch.float64, device=where)
    count = 0
    step = _rows_per_chunk(chunk_mb, 8 * dim)
    for x in copies:
        for start in range(0, len(x), step):
            block = _rows(x, None, where, start, start + step).double()
            total += block.sum(0)
            squares += block.square().sum(0)
            count += len(block)
    mean = total / count
    var = (squares - count * mean.square()) / max(count - 1, 1)
    return mean.float().to(device), var.clamp_min(0).sqrt().float().clamp_min(1e-6).to(device)


def linear_probe(train_x, train_y, val_x, val_y, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 weight_decay: float = 5e-4, batch_size: int = 256, seed: int = 0, *, optimizer: str = "sgd",
                 momentum: float = 0.9, scale_lr: bool = False, schedule: str = "cosine", interval: str = "step",
                 warmup_epochs: float = 0.0, milestones=(60, 80), gamma: float = 0.1, norm: str = "standardize",
                 init_std: float | None = 0.01, eta: float = 0.001, lars_trust: str = "moco_v3",
                 drop_last: bool = False, device="cpu", chunk_mb: float = DEFAULT_CHUNK_MB) -> dict:
    """Train a linear classifier on frozen features; top-1 / top-5 on validation.

    train_x: (N, D) features, or (C, N, D) / a list of C (N, D) features of C augmented copies of the N
    training images; epoch ``e`` then trains on copy ``e % C`` (every image once per epoch, as the standard
    protocol does with fresh random crops). val_x: (M, D).

    The protocol (the ``conf/eval`` presets set it as each reference does): ``optimizer`` SGD or
    LARS (``eta``, ``lars_trust``; biases excluded, as MAE's util/lars.py), base ``lr`` (times
    ``batch_size / 256`` with ``scale_lr``), ``weight_decay``, ``momentum``, ``schedule`` /
    ``interval`` / ``warmup_epochs`` / ``milestones`` / ``gamma`` (see ``probe_lr_schedule``), and
    the features' normalisation ``norm``: ``standardize`` (mean / std of the training features,
    fixed), ``batchnorm`` (BatchNorm without affine in the head, batch statistics while training,
    running ones for validation) or ``none``. ``drop_last``: skip each epoch's incomplete last batch
    (the loaders of MAE and solo-learn do; a batch of one sample is always skipped under ``batchnorm``).

    The head trains on ``device``. The features stay where they are (the host, after extraction): each
    epoch's shuffled rows go to the device ``chunk_mb`` MiB at a time (a whole number of batches), so the
    device holds one chunk, the head and its optimizer state whatever N is. The head's initialisation and
    every epoch's order come from a CPU generator seeded with ``seed``, so the batches are the same on
    every device and for every chunk size.
    """
    _check_choice("optimizer", optimizer, PROBE_OPTIMIZERS)
    _check_choice("schedule", schedule, PROBE_SCHEDULES)
    _check_choice("interval", interval, PROBE_INTERVALS)
    _check_choice("norm", norm, PROBE_NORMS)
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    copies = _copies(train_x)
    n, dim = copies[0].shape
    shift = scale = None
    if norm == "standardize":
        shift, scale = feature_moments(copies, device, chunk_mb)
    head = probe_head(dim, num_classes, norm, init_std, g).to(device)
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
    ty = train_y.to(device)
    chunk = _rows_per_chunk(chunk_mb, 4 * dim, multiple=batch_size)
    head.train()
    step = 0
    for epoch in range(epochs):
        tx = copies[epoch % len(copies)]
        order = torch.randperm(n, generator=g)[: steps_per_epoch * batch_size]
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            xs = _rows(tx, idx, device)  # a new tensor: standardized in place
            if shift is not None:
                xs.sub_(shift).div_(scale)
            ys = ty[idx.to(device)]
            for b in range(0, len(idx), batch_size):
                for group in opt.param_groups:
                    group["lr"] = lrs[step]
                loss = F.cross_entropy(head(xs[b:b + batch_size]), ys[b:b + batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    head.eval()
    metrics = [_accuracy_metric(num_classes, k, device) for k in (1, 5)]
    vy = val_y.to(device)
    rows = _rows_per_chunk(chunk_mb, 4 * (dim + num_classes))
    with torch.no_grad():
        for start in range(0, len(val_x), rows):
            stop = start + rows
            xs = _rows(val_x, None, device, start, stop)
            if shift is not None:
                xs = (xs - shift) / scale
            logits = head(xs)
            for m in metrics:
                m.update(logits, vy[start:stop])
    return {"top1": float(metrics[0].compute()), "top5": float(metrics[1].compute())}


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
def knn_topk(bank_x, bank_y, queries, k: int, device="cpu", chunk_mb: float = DEFAULT_CHUNK_MB,
             normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, N)`` most cosine-similar rows of the bank (N, D) for every query (M, D): their similarities
    (M, k) in descending order and their labels (M, k), on ``device``.

    The queries stay on ``device``; the bank streams through it ``chunk_mb`` MiB at a time, and each
    chunk's similarities are computed ``chunk_mb`` MiB of (queries x bank rows) at a time, each query
    keeping a running top-k: the device holds the queries, one bank chunk, one similarity tile and the
    (M, k) running result, whatever N is. ``normalized``: the rows are already unit vectors.
    """
    device = torch.device(device)
    q = queries.to(device).float()
    q = q if normalized else F.normalize(q, dim=1)
    m, n = len(q), len(bank_x)
    k = min(int(k), n)
    best_s = torch.full((m, k), float("-inf"), device=device)
    best_l = torch.zeros((m, k), dtype=torch.long, device=device)
    if k == 0 or m == 0:
        return best_s, best_l
    bank_rows = _rows_per_chunk(chunk_mb, 4 * q.shape[1])
    for b0 in range(0, n, bank_rows):
        b = _rows(bank_x, None, device, b0, b0 + bank_rows)
        b = b if normalized else F.normalize(b, dim=1)
        by = bank_y[b0:b0 + bank_rows].to(device)
        tile = _rows_per_chunk(chunk_mb, 4 * len(b))
        for q0 in range(0, m, tile):
            sim = q[q0:q0 + tile] @ b.T
            s, i = sim.topk(min(k, len(b)), dim=1)
            cand_s = torch.cat([best_s[q0:q0 + tile], s], 1)
            cand_l = torch.cat([best_l[q0:q0 + tile], by[i]], 1)
            top_s, top_i = cand_s.topk(k, dim=1)
            best_s[q0:q0 + tile], best_l[q0:q0 + tile] = top_s, cand_l.gather(1, top_i)
    return best_s, best_l


def knn_votes(top_s: torch.Tensor, top_l: torch.Tensor, num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """Weighted kNN votes (M, num_classes) of the first ``k`` neighbours (Wu et al. 2018; solo-learn
    solo/utils/knn.py with cosine distance): each neighbour adds exp(similarity / T) to its class. A
    neighbour of similarity -inf (none found) adds 0."""
    weights = (top_s[:, :k] / temperature).exp()
    votes = torch.zeros(len(top_s), num_classes, device=top_s.device)
    return votes.scatter_add_(1, top_l[:, :k], weights)


def knn_scores(train_x, train_y, val_x, num_classes: int, k: int = 20, temperature: float = 0.07,
               device="cpu", chunk_mb: float = DEFAULT_CHUNK_MB) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, votes weighted by exp(sim / T); (M, C) on the CPU."""
    top_s, top_l = knn_topk(train_x, train_y, val_x, k, device, chunk_mb)
    return knn_votes(top_s, top_l, num_classes, top_s.shape[1], temperature).cpu()


def knn_accuracy(train_x, train_y, val_x, val_y, num_classes: int, ks, temperature: float, device="cpu",
                 chunk_mb: float = DEFAULT_CHUNK_MB) -> dict[int, float]:
    """Top-1 accuracy of the weighted kNN for every k in ``ks``: one neighbour search with the largest k (the
    top-k are sorted, so the first k of them are the k nearest), votes counted ``chunk_mb`` MiB at a time."""
    top_s, top_l = knn_topk(train_x, train_y, val_x, max(int(k) for k in ks), device, chunk_mb)
    vy = val_y.to(top_s.device)
    rows = _rows_per_chunk(chunk_mb, 4 * num_classes)
    out = {}
    for k in ks:
        k_used = min(int(k), top_s.shape[1])
        metric = _accuracy_metric(num_classes, 1, top_s.device)
        for start in range(0, len(top_s), rows):
            votes = knn_votes(top_s[start:start + rows], top_l[start:start + rows], num_classes, k_used, temperature)
            metric.update(votes, vy[start:start + rows])
        out[int(k)] = float(metric.compute())
    return out


# --- seeds, memory, the whole evaluation -----------------------------------------------------------------


def probe_seeds(ecfg) -> list[int]:
    """``eval.seeds`` (a list of ints: the linear probe runs once per seed), or ``[eval.seed]``."""
    from .config import ConfigError

    seeds = ecfg.get("seeds")
    if seeds is None:
        return [int(ecfg.seed)]
    try:
        out = [int(s) for s in seeds] if not isinstance(seeds, (str, int, float)) else None
    except (TypeError, ValueError):
        out = None
    if not out or any(isinstance(s, bool) for s in seeds):
        raise ConfigError(f"eval.seeds: '{seeds}' is not a non-empty list of integers; e.g. eval.seeds=[0,1,2] "
                          "(null: eval.seed only)")
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def probe_chunk_mb(ecfg) -> float:
    from .config import ConfigError

    chunk = float(ecfg.get("chunk_mb", DEFAULT_CHUNK_MB))
    if not chunk > 0:
        raise ConfigError(f"eval.chunk_mb: {chunk} is not positive; e.g. eval.chunk_mb={DEFAULT_CHUNK_MB}")
    return chunk


def probe_feature_bytes(n_train: int, n_val: int, dim: int, copies: int) -> int:
    """Host memory (rank 0) of the extracted float32 features: the training set's center crops (the kNN bank),
    ``copies`` augmented copies of it (the linear head's training data) and the validation set."""
    return 4 * dim * ((1 + copies) * n_train + n_val)


def augment_copies(ecfg, n_train: int, n_val: int, dim: int | None) -> int:
    """``eval.linear.augment_copies`` for ``n_train`` training and ``n_val`` validation images of ``dim``
    features, within ``eval.feature_memory_gb`` (the host memory rank 0 may spend on features; null: no limit).

    ``auto``: ``AUTO_COPIES`` copies, or as many as fit (0: the head trains on the center crops). A number
    of copies that does not fit, or center crops + validation alone over the limit, is a ``ConfigError``
    naming the memory needed and the setting to change, raised before any work (``train`` checks at start).
    """
    from .config import ConfigError

    setting = ecfg.linear.get("augment_copies", 0)
    auto = isinstance(setting, str) and setting == "auto"
    if not auto:
        try:
            valid = not isinstance(setting, bool) and int(setting) == float(setting) and int(setting) >= 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"eval.linear.augment_copies: '{setting}' is not 'auto' or a whole number >= 0 "
                              "(0: the head trains on center crops)")
    limit = ecfg.get("feature_memory_gb")
    if limit is None or dim is None:
        return AUTO_COPIES if auto else int(setting)
    budget = float(limit) * GB
    base, per_copy = probe_feature_bytes(n_train, n_val, dim, 0), probe_feature_bytes(n_train, 0, dim, 1) - \
        probe_feature_bytes(n_train, 0, dim, 0)
    if base > budget:
        raise ConfigError(f"eval.feature_memory_gb: the center-crop features of {n_train} training and {n_val} "
                          f"validation images x {dim} float32 need {base / GB:.2f} GB, more than {float(limit):g}; "
                          f"raise eval.feature_memory_gb to at least {math.ceil(base / GB * 100) / 100:g}")
    fit = int((budget - base) // per_copy) if per_copy else AUTO_COPIES
    if auto:
        return min(AUTO_COPIES, fit)
    copies = int(setting)
    if copies > fit:
        need = probe_feature_bytes(n_train, n_val, dim, copies)
        raise ConfigError(f"eval.linear.augment_copies: {copies} augmented copies of {n_train} x {dim} float32 training "
                          f"features need {need / GB:.2f} GB with the center crops and validation, more than "
                          f"eval.feature_memory_gb={float(limit):g}; use eval.linear.augment_copies={fit} (or auto), "
                          f"or raise eval.feature_memory_gb to {math.ceil(need / GB * 100) / 100:g}")
    return copies


def check_probe_memory(ecfg, datamodule, dim: int) -> int:
    """``augment_copies`` for this data module's probe sets: called by ``train`` before training, so a setting
    that does not fit fails at start-up rather than after pre-training. Returns the number of copies."""
    n_train, n_val = len(datamodule.probe_train_set), len(datamodule.val_set)
    probe_chunk_mb(ecfg)
    probe_seeds(ecfg)
    return augment_copies(ecfg, n_train, n_val, dim)


def evaluate_features(train_x, train_y, val_x, val_y, num_classes: int, ecfg, linear_x=None, device="cpu") -> dict:
    """Linear probe and kNN metrics from extracted features, keyed as in ``summary.json``; both on ``device``.

    train_x (N, D): center-crop features, the kNN's memory bank; the linear head trains on
    ``linear_x`` (C, N, D) or a list of C (N, D), the features of C augmented copies, when given, else on
    ``train_x``. With ``eval.seeds`` the linear probe runs once per seed (head initialisation and data order;
    the features are the same) and ``linear_probe_top1`` / ``_top5`` are the means, next to
    ``linear_probe_top1_seeds`` (per seed), ``_mean`` and ``_std`` (sample standard deviation). The kNN has
    no randomness: one value.
    """
    chunk = probe_chunk_mb(ecfg)
    seeds = probe_seeds(ecfg)
    runs = [linear_probe(train_x if linear_x is None else linear_x, train_y, val_x, val_y, num_classes, seed=s,
                         device=device, chunk_mb=chunk, **linear_probe_options(ecfg.linear)) for s in seeds]
    out: dict = {}
    for key in ("top1", "top5"):
        values = [r[key] for r in runs]
        mean, std = _mean_std(values)
        out[f"linear_probe_{key}"] = mean  # the value itself for one seed
        if ecfg.get("seeds") is not None:
            out[f"linear_probe_{key}_seeds"] = values
            out[f"linear_probe_{key}_mean"] = mean
            out[f"linear_probe_{key}_std"] = std
    if ecfg.get("seeds") is not None:
        out["linear_probe_seeds"] = seeds
    ks = [int(k) for k in ecfg.knn.k]
    knn = knn_accuracy(train_x, train_y, val_x, val_y, num_classes, ks, float(ecfg.knn.temperature), device, chunk)
    for k in ks:
        out["knn_top1" if k == ks[0] else f"knn{k}_top1"] = knn[k]
    return out


def evaluate_backbone(backbone: nn.Module, datamodule, transform: EvalTransform, ecfg, device="cpu",
                      return_features: bool = False):
    """Extract features with the frozen backbone and run both probes: the metrics dict, or with
    ``return_features`` ``(metrics, (val_x (N, D), val_y (N,)))`` (CPU tensors, e.g. for plots).

    Validation and the kNN bank use center crops (``transform``); the linear head trains on
    ``eval.linear.augment_copies`` fixed random crops of each training image (``ProbeCrops``; ``auto``: as
    many as ``eval.feature_memory_gb`` allows, at most 4), or on the center crops when that is 0.

    Everything runs on ``device`` (the Trainer's): extraction, linear probe and kNN, with features moving
    between host and device ``eval.chunk_mb`` MiB at a time (see ``linear_probe`` and ``knn_topk``).

    Under DDP every rank calls it once the process group exists: the backbone takes rank 0's buffers
    (BatchNorm statistics, which ranks without SyncBatchNorm keep apart; rank 0's are the checkpoint's),
    each rank embeds its share of every set (``extract_features``), rank 0 alone holds the features and
    runs the probes, and every rank returns rank 0's metrics (the features: ``None`` on the others).
    The other ranks wait for rank 0's probes in that broadcast, within the process group's timeout.
    """
    broadcast_tensors_(list(backbone.buffers()), src=0)
    before = weights_checksum(backbone)
    train_loader, val_loader = datamodule.probe_dataloaders(batch_size=int(ecfg.batch_size))
    dim = getattr(backbone, "num_features", None)
    n_copies = augment_copies(ecfg, len(train_loader.dataset), len(val_loader.dataset),
                              int(dim) if dim is not None else None)
    chunk = probe_chunk_mb(ecfg)
    transform = transform.to(device)
    train_x, train_y = extract_features(backbone, train_loader, transform, device, chunk)
    val_x, val_y = extract_features(backbone, val_loader, transform, device, chunk)
    lin, linear_x = ecfg.linear, None
    if n_copies > 0:
        crops = [ProbeCrops(transform, c, int(ecfg.seed), tuple(lin.crop_scale), flip_prob=float(lin.flip_prob))
                 for c in range(n_copies)]
        linear_x = [extract_features(backbone, train_loader, t, device, chunk)[0] for t in crops]
    if weights_checksum(backbone) != before:
        raise RuntimeError("evaluation changed the backbone's weights or BatchNorm statistics")
    metrics = None
    if rank() == 0:
        known = train_y >= 0
        if not bool(known.all()):
            train_x, train_y = train_x[known], train_y[known]
            linear_x = None if linear_x is None else [x[known] for x in linear_x]
        metrics = evaluate_features(train_x, train_y, val_x, val_y, datamodule.num_classes, ecfg, linear_x, device)
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
