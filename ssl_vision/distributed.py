"""Rank-aware helpers. Everything degrades to the identity in a single process."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

# torch 2.x flags torch.distributed.nn.functional.all_gather as deprecated in favour of a private
# module; it is the public differentiable gather (DESIGN.md), so the per-rank warning is noise
warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0; gradients flow back to every rank's input."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, without gradient (keys, features, labels)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def _sizes(x: torch.Tensor) -> list[int]:
    """Every rank's ``x.shape[0]`` (one small all_gather and a host read: for evaluation, not steps)."""
    return gather_no_grad(torch.tensor([x.shape[0]], device=x.device)).tolist()


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    pad = torch.zeros((n - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad]).contiguous()


@torch.no_grad()
def gather_to(x: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Concatenate ``x`` (first dimension may differ between ranks) from all ranks on rank ``dst`` only.

    Rank ``dst`` gets the whole tensor, every other rank ``None``: only one process ever holds it (e.g.
    the feature matrix of an evaluation, which all ranks extracted a share of). One process: ``x``.
    """
    if world_size() == 1:
        return x
    sizes = _sizes(x)
    mine = _padded(x, max(sizes))
    chunks = [torch.empty_like(mine) for _ in sizes] if rank() == dst else None
    dist.gather(mine, chunks, dst=dst)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)]) if chunks is not None else None


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. metrics computed on one rank)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensors_(tensors, src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s (buffers that must agree across ranks)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=src)
