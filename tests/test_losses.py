import math

import torch
import torch.nn.functional as F

from ssl_vision.losses import nt_xent


def reference_nt_xent(z1, z2, t):
    """SimCLR's loss written out sample by sample (Chen et al. 2020, Alg. 1)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


def test_nt_xent_matches_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.1, 0.5, 1.0):
        assert abs(float(nt_xent(z1, z2, t)) - reference_nt_xent(z1, z2, t)) < 1e-5


def test_nt_xent_gathered_equals_full_batch():
    """Rank r's loss with gathered keys, averaged over ranks, equals the single-process loss."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    full = nt_xent(z1, z2, 0.2)
    per_rank = [nt_xent(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4], 0.2, z1, z2, rank=r) for r in range(2)]
    assert torch.allclose(torch.stack(per_rank).mean(), full, atol=1e-6)


def test_nt_xent_is_low_for_matching_views_and_high_for_random():
    z = torch.eye(6)
    good = nt_xent(z, z.clone(), 0.1)
    bad = nt_xent(z, z[torch.tensor([1, 2, 3, 4, 5, 0])], 0.1)
    assert good < 0.01 and bad > 5
