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


def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """``gather_no_grad`` for tensors whose first dimension differs between ranks."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather_no_grad(n).tolist()
    pad = torch.zeros((max(sizes) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    full = gather_no_grad(torch.cat([x, pad]))
    chunks = full.split(max(sizes))
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)])
