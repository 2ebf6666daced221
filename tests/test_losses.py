import math

import pytest
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


# --- BYOL, SimSiam, Barlow Twins, VICReg, DINO: each against its paper's pseudocode, written out here ---

import numpy as np  # noqa: E402

from ssl_vision.losses import barlow_twins_loss, byol_loss, dino_loss, simsiam_loss, vicreg_loss  # noqa: E402


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def test_byol_loss_is_the_normalized_mse_of_the_paper():
    """Grill et al. eq. 2: ||q/|q| - z'/|z'| ||^2 = 2 - 2 <q, z'> / (|q| |z'|), averaged over the batch."""
    p, z = _rand(6, 5, seed=1), _rand(6, 5, seed=2)
    expected = 0.0
    for i in range(6):
        a, b = p[i].double().numpy(), z[i].double().numpy()
        expected += 2 - 2 * a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert abs(float(byol_loss(p, z)) - expected / 6) < 1e-5
    assert float(byol_loss(z * 3.0, z)) < 1e-6  # scale-invariant, 0 for aligned vectors


def test_byol_and_simsiam_stop_the_gradient_of_the_target():
    p, z = _rand(4, 3, seed=3).requires_grad_(), _rand(4, 3, seed=4).requires_grad_()
    (byol_loss(p, z) + simsiam_loss(p, p, z, z)).backward()
    assert p.grad.abs().sum() > 0 and z.grad is None


def test_simsiam_loss_is_the_symmetrized_negative_cosine():
    """Chen & He Alg. 1: L = D(p1, z2)/2 + D(p2, z1)/2, D(p, z) = -(p/|p|) . (z/|z|), batch-averaged."""
    p1, p2, z1, z2 = (_rand(5, 4, seed=s) for s in range(5, 9))

    def d(p, z):
        return -np.mean([p[i] @ z[i] / (np.linalg.norm(p[i]) * np.linalg.norm(z[i])) for i in range(len(p))])

    n = [t.double().numpy() for t in (p1, p2, z1, z2)]
    expected = d(n[0], n[3]) / 2 + d(n[1], n[2]) / 2
    assert abs(float(simsiam_loss(p1, p2, z1, z2)) - expected) < 1e-6


def reference_barlow(z1, z2, lambd):
    """Zbontar et al. Alg. 1 in numpy: batch-normalize each dimension, C = z1n^T z2n / N, sum of squares."""
    a, b = z1.double().numpy(), z2.double().numpy()
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    b = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    c = a.T @ b / a.shape[0]
    d = c.shape[0]
    return sum((1 - c[i, i]) ** 2 if i == j else lambd * c[i, j] ** 2 for i in range(d) for j in range(d))


def test_barlow_twins_loss_matches_the_paper_pseudocode():
    z1, z2 = _rand(10, 6, seed=9) * 3 + 1, _rand(10, 6, seed=10)
    for lambd in (0.0051, 0.5):
        assert abs(float(barlow_twins_loss(z1, z2, lambd)) - reference_barlow(z1, z2, lambd)) < 1e-4
    assert abs(float(barlow_twins_loss(z1, z2, 0.5, scale=0.1)) - 0.1 * reference_barlow(z1, z2, 0.5)) < 1e-5


def test_barlow_twins_and_vicreg_with_fewer_samples_than_dimensions_match_the_reference():
    """N < D takes the N x N Gram path: values against the numpy references, gradients against autograd through
    the reference's D x D matrices (float64)."""
    z1, z2 = _rand(6, 11, seed=21) * 2 + 0.5, _rand(6, 11, seed=22) + 0.3 * _rand(6, 11, seed=21)
    assert abs(float(barlow_twins_loss(z1, z2, 0.0051)) - reference_barlow(z1, z2, 0.0051)) < 1e-4
    assert abs(float(barlow_twins_loss(z1, z2, 0.5)) - reference_barlow(z1, z2, 0.5)) < 1e-3
    loss, terms = vicreg_loss(z1 * 0.3, z2 * 0.3)
    expected, (_, _, cov) = reference_vicreg(z1 * 0.3, z2 * 0.3, 25.0, 25.0, 1.0)
    assert abs(float(loss) - expected) < 1e-4 and abs(float(terms["covariance"]) - cov) < 1e-6 and cov > 0

    def dense_barlow(a, b, lambd=0.0051):
        a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
        b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
        c = a.T @ b / a.shape[0]
        off = c - torch.diag(torch.diagonal(c))
        return (torch.diagonal(c) - 1).pow(2).sum() + lambd * off.pow(2).sum()

    def dense_cov(a, b):
        total = 0
        for t in (a, b):
            c = (t - t.mean(0)).T @ (t - t.mean(0)) / (t.shape[0] - 1)
            total = total + (c - torch.diag(torch.diagonal(c))).pow(2).sum() / t.shape[1]
        return total

    for fast, dense in ((lambda a, b: barlow_twins_loss(a, b, 0.0051), dense_barlow),
                        (lambda a, b: vicreg_loss(a, b, sim_coeff=0.0, std_coeff=0.0, cov_coeff=1.0)[0], dense_cov)):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        fast(a, b).backward()
        a64, b64 = z1.double().requires_grad_(), z2.double().requires_grad_()
        dense(a64, b64).backward()
        assert torch.allclose(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)


def test_barlow_twins_statistics_are_of_the_batch_it_is_given():
    """Two halves' losses averaged differ from the whole batch's: the method must pass it the gathered batch."""
    z1, z2 = _rand(12, 4, seed=11), _rand(12, 4, seed=12) + _rand(12, 4, seed=11)
    whole = float(barlow_twins_loss(z1, z2, 0.0051))
    halves = np.mean([float(barlow_twins_loss(z1[i:i + 6], z2[i:i + 6], 0.0051)) for i in (0, 6)])
    assert abs(whole - halves) > 1e-2


def reference_vicreg(z1, z2, sim, std, cov):
    """Bardes et al. (facebookresearch/vicreg main_vicreg.py) in numpy, term by term."""
    a, b = z1.double().numpy(), z2.double().numpy()
    n, d = a.shape
    inv = ((a - b) ** 2).mean()
    var = 0.0
    for x in (a, b):
        s = np.sqrt(x.var(0, ddof=1) + 1e-4)
        var += np.maximum(0, 1 - s).mean() / 2
    c_total = 0.0
    for x in (a, b):
        xc = x - x.mean(0)
        c = xc.T @ xc / (n - 1)
        c_total += sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return sim * inv + std * var + cov * c_total, (inv, var, c_total)


def test_vicreg_loss_matches_the_reference_terms():
    z1, z2 = _rand(9, 5, seed=13) * 0.5, _rand(9, 5, seed=14) * 0.7 + 0.2
    loss, terms = vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)
    expected, (inv, var, cov) = reference_vicreg(z1, z2, 25.0, 25.0, 1.0)
    assert abs(float(loss) - expected) < 1e-4
    assert abs(float(terms["invariance"]) - inv) < 1e-6 and abs(float(terms["variance"]) - var) < 1e-6
    assert abs(float(terms["covariance"]) - cov) < 1e-6
    assert var > 0 and cov > 0  # the test data exercise both regularizers


def test_vicreg_ranks_with_gathered_statistics_average_to_the_full_batch_loss():
    """Rank r: invariance on its own half, variance / covariance on the gathered batch; the mean over ranks
    is the 1-process loss (and per-rank statistics are not)."""
    z1, z2 = _rand(8, 4, seed=15) * 0.3, _rand(8, 4, seed=16) * 0.3
    full, _ = vicreg_loss(z1, z2)
    ranks = [vicreg_loss(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4], z1, z2)[0] for r in range(2)]
    assert torch.allclose(torch.stack(ranks).mean(), full, atol=1e-5)
    local = [vicreg_loss(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4])[0] for r in range(2)]
    assert not torch.allclose(torch.stack(local).mean(), full, atol=1e-3)


def reference_dino(student, teacher, center, ts, tt):
    """Caron et al. Alg. 1 / main_dino.py DINOLoss: pairs (teacher global view iq, student view v != iq)."""
    s = [x.double().numpy() for x in student]
    t = [x.double().numpy() for x in teacher]
    c = center.double().numpy()

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    total, terms = 0.0, 0
    for iq, q in enumerate(t):
        q = softmax((q - c) / tt)
        for v, sv in enumerate(s):
            if v == iq:
                continue
            total += np.mean(np.sum(-q * np.log(softmax(sv / ts)), axis=-1))
            terms += 1
    return total / terms


def test_dino_loss_matches_the_reference_over_pairs_of_different_views():
    student = _rand(6, 5, 7, seed=17)  # 2 global + 4 local views, batch 5, 7 prototypes
    teacher = _rand(2, 5, 7, seed=18)
    center = _rand(1, 7, seed=19) * 0.1
    for tt in (0.04, 0.07):
        expected = reference_dino(student, teacher, center, 0.1, tt)
        assert abs(float(dino_loss(student, teacher, center, 0.1, tt)) - expected) < 1e-4
    # only global views: the 2 cross pairs
    expected = reference_dino(student[:2], teacher, center, 0.1, 0.04)
    assert abs(float(dino_loss(student[:2], teacher, center, 0.1, 0.04)) - expected) < 1e-4


def test_dino_loss_gradient_equals_autograd_through_the_pseudocode():
    """dino_loss's written-out backward: the gradient autograd takes through Alg. 1 (log_softmax, pairs)."""
    teacher, center = _rand(2, 5, 7, seed=23), _rand(1, 7, seed=24) * 0.1
    for views in (6, 2):
        student = _rand(views, 5, 7, seed=22)[:views].double().requires_grad_()
        (3.0 * dino_loss(student, teacher.double(), center.double(), 0.1, 0.04)).backward()
        ref = student.detach().clone().requires_grad_()
        q = torch.softmax((teacher.double() - center.double()) / 0.04, dim=-1)
        logp = torch.log_softmax(ref / 0.1, dim=-1)
        pairs = [-(q[g] * logp[v]).sum(-1).mean() for g in range(2) for v in range(views) if v != g]
        (3.0 * torch.stack(pairs).mean()).backward()
        assert torch.allclose(student.grad, ref.grad, atol=1e-10), views
    with pytest.raises(RuntimeError, match="runs once per graph"):
        loss = dino_loss(_rand(3, 4, 6, seed=25).requires_grad_(), _rand(2, 4, 6, seed=26), torch.zeros(1, 6), 0.1, 0.04)
        loss.backward(retain_graph=True)
        loss.backward()


def test_dino_loss_does_not_train_the_teacher():
    student, teacher = _rand(3, 4, 6, seed=20).requires_grad_(), _rand(2, 4, 6, seed=21).requires_grad_()
    dino_loss(student, teacher, torch.zeros(1, 6), 0.1, 0.04).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
