"""Collapse diagnostics: pure functions of a batch of embeddings (N, D).

Non-contrastive methods (BYOL, SimSiam, DINO, Barlow Twins, VICReg) can collapse without the loss
saying so: every image maps to one point (complete collapse) or the embeddings span only a few
directions (dimensional collapse). ``SSLMethod`` logs both measures below for the backbone features
and for the method's own embedding at the steps the logger writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def normalized_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over the D dimensions of the per-dimension std (over the batch) of the L2-normalized rows.

    0 under complete collapse; about ``1/sqrt(D)`` for embeddings spread evenly over the sphere
    (BYOL / SimSiam papers' collapse monitor; solo-learn logs it as ``z_std``).
    """
    return F.normalize(x.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def rankme(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al. 2023, eq. 1), the effective rank of the (N, D) embedding matrix.

    With singular values ``s_k``: ``p_k = s_k / sum(s) + eps`` and ``RankMe = exp(-sum_k p_k log p_k)``;
    between about 1 (all rows on one line) and ``min(N, D)`` (all singular values equal).
    """
    s = torch.linalg.svdvals(x.float())
    p = s / s.sum() + eps
    return torch.exp(-(p * p.log()).sum())
