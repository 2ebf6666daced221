import torch

from ssl_vision.optim import LARS, scaled_lr, warmup_cosine


def test_warmup_cosine_end_points():
    assert warmup_cosine(0, 10, 100) == 0.1
    assert warmup_cosine(9, 10, 100) == 1.0
    assert warmup_cosine(10, 10, 100) == 1.0
    assert abs(warmup_cosine(55, 10, 100) - 0.5) < 1e-9
    assert warmup_cosine(100, 10, 100) == 0.0
    assert abs(warmup_cosine(100, 0, 100, min_ratio=0.1) - 0.1) < 1e-12


def test_linear_scaling_rule():
    assert scaled_lr(0.3, 4096) == 0.3 * 16
    assert scaled_lr(0.3, 4096, scale=False) == 0.3


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9, eta=0.02)
    opt.step()
    g = gw + 0.1 * w0
    trust = 0.02 * w0.norm() / g.norm()
    assert torch.allclose(w.detach(), w0 - 0.5 * trust * g, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - 0.5 * gb, atol=1e-6)  # excluded: plain SGD step
