"""Collapse diagnostics (ssl_vision.diagnostics) against their definitions, computed here another way."""

import math

import numpy as np
import torch

from ssl_vision.diagnostics import normalized_std, rankme


def reference_rankme(x, eps=1e-7):
    """Garrido et al. 2023 eq. 1 from the eigenvalues of X^T X (singular values = their square roots)."""
    a = x.double().numpy()
    s = np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ a), 0, None))[::-1][: min(a.shape)]
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_matches_its_definition_and_its_extremes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g) @ torch.diag(torch.tensor([4.0, 2, 1, 1, 0.5, 0.1, 0.05, 0.01]))
    assert abs(float(rankme(x)) - reference_rankme(x)) < 1e-3
    q, _ = torch.linalg.qr(torch.randn(32, 16, generator=g))  # 16 orthonormal columns: all singular values 1
    assert abs(float(rankme(q)) - 16) < 1e-3
    collapsed = torch.randn(32, 1, generator=g) @ torch.randn(1, 16, generator=g)  # rank 1
    assert float(rankme(collapsed)) < 1.01


def test_normalized_std_is_zero_when_collapsed_and_one_over_sqrt_d_when_spread():
    g = torch.Generator().manual_seed(1)
    point = torch.randn(1, 64, generator=g).repeat(128, 1) * torch.rand(128, 1, generator=g)  # one direction
    assert float(normalized_std(point)) < 1e-5
    spread = torch.randn(20000, 64, generator=g)
    assert abs(float(normalized_std(spread)) - 1 / math.sqrt(64)) < 2e-3
    x = torch.randn(7, 5, generator=g)
    rows = x / x.norm(dim=1, keepdim=True)
    expected = np.mean([np.std(rows[:, j].numpy(), ddof=1) for j in range(5)])
    assert abs(float(normalized_std(x)) - expected) < 1e-6
