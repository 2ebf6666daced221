"""One optimizer step of every method on any device, 1 process on the whole batch against 2 ranks on its halves.

The step of ``tests/test_ddp.py``'s equivalence test (``forward_views``, backward, gradients and loss
averaged over the ranks as DDP does, ``on_before_optimizer_step`` (DINO's clipping), SGD at lr 0.5, the EMA
update at 0.9), for every method of ``ssl_vision.methods.METHODS`` with its default configuration, its heads
capped (``capped_overrides``), on a small backbone (``resnet18_tiny``, or ``vit_tiny`` for ViT-only methods), so
a new method is checked without being listed here. The views come from the method's own augmentation on a fixed uint8 batch, made once on
the CPU (every process makes the same ones) and moved to the device; per-sample random draws inside the
step (MAE's mask) are keyed by sample index (``SSLMethod.keyed_rand``), so a rank draws for its samples
exactly what one process draws for them.

BatchNorm: ``eval`` (running statistics, as tests/test_ddp.py: per-rank batch statistics differ from the
whole batch's by construction, and torch has no CPU SyncBatchNorm), ``train`` (batch statistics, one process)
or ``sync`` (``nn.SyncBatchNorm``, batch statistics over all ranks: on GPUs, equal to ``train`` on the whole
batch). ``tools/gpu_check.py`` compares: the step on the device against the step on the CPU (one process);
2 NCCL ranks with SyncBatchNorm against one process on the GPU (2+ GPUs); 2 gloo ranks against one process on
the CPU (the CPU lane).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

RTOL_SAME_DEVICE, ATOL_SAME_DEVICE = 1e-4, 1e-5  # 2 ranks vs 1 process, same kernels
RTOL_CROSS_DEVICE, ATOL_CROSS_DEVICE = 1e-3, 1e-4  # GPU vs CPU kernels (TF32 off), after one SGD step at lr 0.5


def capped_overrides(method_cfg, dim_cap: int | None, depth_cap: int | None) -> list[str]:
    """Overrides that shrink a method's heads for a quick step: integer ``*_dim`` settings above ``dim_cap``
    and ``*_depth`` settings above ``depth_cap`` (MAE's decoder) to the cap. (MoCo's ``queue_size`` depends on
    the batch: the callers set it.)"""
    out = []
    for key, value in method_cfg.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if dim_cap and key.endswith("_dim") and value > dim_cap:
            out.append(f"method.{key}={dim_cap}")
        elif depth_cap and key.endswith("_depth") and value > depth_cap:
            out.append(f"method.{key}={depth_cap}")
    return out


def local_view_overrides(augment_cfg, image_size: int) -> list[str]:
    """Views configured larger than ``image_size`` (DINO's 96 px local crops on small test images) become
    local views of half the image size."""
    out = []
    for name, view in (augment_cfg.get("views") or {}).items():
        size = (view or {}).get("size")
        if size not in (None, "auto") and int(size) > image_size:
            out.append(f"augment.views.{name}.size={max(1, image_size // 2)}")
    return out


def backbone_for(method_class, vit: str, resnet: str) -> str:
    """``resnet`` for a method that takes a ResNet (``SSLMethod.backbone_kinds``), else ``vit``."""
    return resnet if "resnet" in method_class.backbone_kinds else vit


def method_cfg(name: str, image_size: int, batch: int, dim_cap: int | None):
    """The training config of ``name`` on a small backbone at ``image_size``, heads capped at ``dim_cap``."""
    from hydra import compose, initialize_config_dir

    from ssl_vision.config import conf_dir
    from ssl_vision.methods import METHODS

    backbone = backbone_for(METHODS[name], "vit_tiny", "resnet18_tiny")
    base = [f"method={name}", f"backbone={backbone}", "data=synthetic", f"data.image_size={image_size}"]
    if backbone.startswith("vit"):
        base += ["backbone.patch_size=4", "+backbone.kwargs.depth=2"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="train", overrides=base)
        extra = capped_overrides(cfg.method, dim_cap, 1) + local_view_overrides(cfg.augment, image_size)
        if "queue_size" in cfg.method:
            extra.append(f"method.queue_size={4 * batch}")
        return compose(config_name="train", overrides=base + extra)


_CONFIGS: dict = {}


def build(name: str, image_size: int, batch: int, dim_cap: int | None):
    """The method with its initial weights drawn from seed 0 (the same in every process), on the CPU."""
    import copy

    from ssl_vision.methods import build_method

    key = (name, image_size, batch, dim_cap)
    if key not in _CONFIGS:
        _CONFIGS[key] = method_cfg(name, image_size, batch, dim_cap)
    cfg = copy.deepcopy(_CONFIGS[key])
    torch.manual_seed(0)
    return build_method(cfg, num_classes=0)


def fixed_views(model, batch: int, image_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The method's own augmented views of a fixed uint8 batch (CPU; the same in every process), and the indexes."""
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    indexes = torch.arange(batch)
    return [v.contiguous() for v in model.augment(images, indexes=indexes)], indexes


def one_step(model, views, indexes, device, bn: str = "eval", rank: int = 0, world: int = 1):
    """One SGD step of ``model`` (moved to ``device``) on this rank's share of ``views``: (loss, state dict)
    on the CPU. With ``world > 1`` a process group must exist; gradients and the loss are averaged over it."""
    model = model.to(device)
    if bn == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    if bn == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    n = len(indexes) // world
    share = slice(rank * n, (rank + 1) * n)
    local = [v[share].to(device) for v in views]
    if getattr(model, "channels_last", False):
        local = [v.contiguous(memory_format=torch.channels_last) for v in local]
    model._batch_keys = (indexes[share].to(device), 0)  # keyed per-sample draws, as in a training batch
    try:
        out = model.forward_views(local)
    finally:
        model._batch_keys = None
    loss = sgd_step(model, out["loss"], world)
    return loss.cpu(), {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def sgd_step(model, loss: torch.Tensor, world: int = 1) -> torch.Tensor:
    """Backward of ``loss``, the gradients averaged over ``world`` ranks as DDP does (a process group must exist
    for ``world > 1``), the method's ``on_before_optimizer_step``, one SGD step (lr 0.5) and the EMA updates
    (0.9): the step the equivalence checks compare. Returns the loss, averaged over the ranks."""
    from ssl_vision.methods.base import ema_update

    params = [p for p in model.parameters() if p.requires_grad]
    loss.backward()
    loss = loss.detach().float()
    if world > 1:  # what DDP does: average the gradients (and, for the report, the losses)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
        dist.all_reduce(loss)
        loss /= world
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.on_before_optimizer_step(optimizer)  # DINO: per-parameter clipping, last-layer freeze
    optimizer.step()
    for online, target in model._momentum_pairs:
        ema_update(online, target, 0.9)
    return loss


def difference(a, b, rtol: float, atol: float) -> dict:
    """How far step ``a`` = (loss, state) is from ``b``: the largest absolute difference, and the entry (loss or
    state tensor) that exceeds its tolerance ``atol + rtol * max |b|`` most (its ratio: <= 1 passes). The
    tolerance scales with each tensor's largest magnitude, not each element's: float32 sums taken in another
    order (over 2 ranks, or by other kernels) differ by a few ulps of the largest terms, which an element that
    ends small by cancellation (a bias after one large SGD step) does not shrink."""
    (loss_a, state_a), (loss_b, state_b) = a, b
    pairs = [("loss", loss_a, loss_b)] + [(k, state_a[k], state_b[k]) for k in state_b if k in state_a]
    worst, worst_key, largest = 0.0, None, 0.0
    for key, x, y in pairs:
        x, y = x.double(), y.double()
        if x.numel() == 0:
            continue
        diff = float((x - y).abs().max())
        largest = max(largest, diff)
        ratio = diff / (atol + rtol * float(y.abs().max()))
        if not ratio <= worst:  # also catches NaN
            worst, worst_key = ratio, key
    same_keys = state_a.keys() == state_b.keys()
    return {"max_abs_difference": largest, "worst_entry": worst_key, "worst_tolerance_ratio": worst,
            "same_entries": same_keys, "rtol": rtol, "atol": atol, "ok": same_keys and worst <= 1.0}


def rank_worker(rank: int, world: int, backend: str, init_file: str, out_file: str, names: list[str],
                batch: int, image_size: int, dim_cap: int | None, bn: str) -> None:
    """One rank of the 2-rank step of every method in ``names``; rank 0 saves {name: (loss, state)}."""
    torch.set_num_threads(1)
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        results = {}
        with exact_float32():
            for name in names:
                model = build(name, image_size, batch, dim_cap)
                views, indexes = fixed_views(model, batch, image_size)
                results[name] = one_step(model, views, indexes, device, bn, rank, world)
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(backend: str, names: list[str], batch: int, image_size: int, dim_cap: int | None, bn: str,
                  tmp_dir, start_method: str) -> dict:
    """Rank 0's results of a 2-process launch of ``rank_worker``."""
    import torch.multiprocessing as mp

    init_file, out_file = os.path.join(tmp_dir, "init"), os.path.join(tmp_dir, "ranks.pt")
    for path in (init_file, out_file):
        if os.path.exists(path):
            os.remove(path)
    mp.start_processes(rank_worker, args=(2, backend, init_file, out_file, names, batch, image_size, dim_cap, bn),
                       nprocs=2, join=True, start_method=start_method)
    return torch.load(out_file, weights_only=False)


@contextlib.contextmanager
def exact_float32():
    """Full float32 matmuls and convolutions on GPUs (no TF32) inside the block: the comparisons' tolerances
    assume them. The settings before it are restored after it (later measurements use the run's own)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
