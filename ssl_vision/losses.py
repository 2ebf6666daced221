"""Loss functions: pure functions of tensors.

Cross-rank gathering happens in the caller (``ssl_vision.distributed``); a loss receives the local
tensors, the gathered ones, and this rank's offset into the gathered batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            z1_all: torch.Tensor | None = None, z2_all: torch.Tensor | None = None,
            rank: int = 0) -> torch.Tensor:
    """SimCLR's NT-Xent (InfoNCE over 2N-1 candidates).

    z1, z2: (B, D) projections of the two views of this rank's batch.
    z1_all, z2_all: (W*B, D) the same gathered from all ranks (with gradient), or None (one process).
    Each local sample's positive is its other view; all other 2WB-2 samples are negatives; the
    similarity of a sample to itself is masked at this rank's offset ``rank * B``.
    """
    b = z1.shape[0]
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    n_all = z1_all.shape[0]
    q = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D)
    k = F.normalize(torch.cat([z1_all, z2_all]), dim=1)  # (2WB, D)
    logits = q @ k.T / temperature  # (2B, 2WB)
    local = torch.arange(b, device=q.device) + rank * b
    self_idx = torch.cat([local, local + n_all])
    pos_idx = torch.cat([local + n_all, local])
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * b, device=q.device), self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)
