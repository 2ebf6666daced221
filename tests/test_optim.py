import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_vision.config import ConfigError
from ssl_vision.optim import LARS, build_optimizer, check_optimizer_config, scaled_lr, warmup_cosine


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


# --- LARS against each reference's update, written out per tensor -----------------------------------


def solo_learn_reference(p, g, buf, lr, wd, eta, clip, excluded, momentum=0.9, eps=1e-8):
    """vturrisi/solo-learn solo/utils/lars.py (HEAD 9187ea3), LARS.step for one tensor:
    exclude_bias_n_norm skips both the adaptation and the weight decay; so does a zero norm."""
    d = g
    if not excluded:
        p_norm, g_norm = float(p.norm()), float(g.norm())
        if p_norm != 0 and g_norm != 0:
            lars_lr = eta * p_norm / (g_norm + p_norm * wd + eps)
            if clip:
                lars_lr = min(lars_lr / lr, 1)
            d = (g + wd * p) * lars_lr
    buf = d.clone() if buf is None else momentum * buf + d
    return p - lr * buf, buf


def moco_v3_reference(p, g, mu, lr, wd, eta, excluded, momentum=0.9):
    """facebookresearch/moco-v3 moco/optimizer.py (= facebookresearch/mae util/lars.py), one tensor:
    parameters of <= 1 dimension get neither weight decay nor adaptation; mu starts at zero."""
    d = g
    if not excluded:
        d = g + wd * p
        p_norm, u_norm = float(p.norm()), float(d.norm())
        q = eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
        d = d * q
    mu = (torch.zeros_like(p) if mu is None else mu) * momentum + d
    return p - lr * mu, mu


def fixed_problem():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (3, 3, 2, 2), (5, 7), (4, 4)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    grad_scales = [1e-3, 1.0, 30.0, 0.0]  # the last weight gets an all-zero gradient
    steps = [[torch.randn(s, generator=g) * c for s, c in zip(shapes, grad_scales)] for _ in range(2)]
    biases = [torch.randn(4, generator=g), torch.zeros(3)]  # a zero-norm bias too
    bias_steps = [[torch.randn(4, generator=g), torch.randn(3, generator=g)] for _ in range(2)]
    return weights, steps, biases, bias_steps


HOST_SCALARS = pytest.mark.parametrize("host", [True, False], ids=["host-scalars", "device-scalars"])


def run_lars(weights, steps, biases, bias_steps, lrs, wd, **kwargs):
    w = [torch.nn.Parameter(x.clone()) for x in weights]
    b = [torch.nn.Parameter(x.clone()) for x in biases]
    opt = LARS([{"params": w, "weight_decay": wd}, {"params": b, "weight_decay": 0.0, "lars_exclude": True}],
               lr=lrs[0], momentum=0.9, **kwargs)
    for lr, gw, gb in zip(lrs, steps, bias_steps):
        for group in opt.param_groups:
            group["lr"] = lr  # as the scheduler sets it
        for p, grad in zip(w + b, gw + gb):
            p.grad = grad.clone()
        opt.step()
    return [p.detach() for p in w], [p.detach() for p in b]


@pytest.mark.parametrize("clip", [True, False])
@HOST_SCALARS
def test_lars_solo_learn_formula_with_and_without_clipping(clip, host):
    weights, steps, biases, bias_steps = fixed_problem()
    lrs, wd, eta = [0.4, 0.2], 1e-4, 0.02
    got_w, got_b = run_lars(weights, steps, biases, bias_steps, lrs, wd, eta=eta, trust="solo_learn", clip_lr=clip,
                            host_scalars=host)
    for i, p in enumerate(weights):
        buf = None
        for lr, gw in zip(lrs, steps):
            p, buf = solo_learn_reference(p, gw[i], buf, lr, wd, eta, clip, excluded=False)
        assert torch.allclose(got_w[i], p, atol=1e-6, rtol=1e-5), i
    for i, p in enumerate(biases):
        buf = None
        for lr, gb in zip(lrs, bias_steps):
            p, buf = solo_learn_reference(p, gb[i], buf, lr, 0.0, eta, clip, excluded=True)
        assert torch.allclose(got_b[i], p, atol=1e-6), i
    # the fixture exercises both sides of the clip: tiny gradients give trust > lr, large ones trust < lr
    trusts = [eta * float(p.norm()) / (float(g.norm()) + float(p.norm()) * wd + 1e-8)
              for p, g in zip(weights, steps[0]) if float(g.norm()) > 0]
    assert min(trusts) < lrs[0] < max(trusts)
    # the zero-gradient weight keeps its value: no weight decay without a gradient (solo-learn)
    assert torch.equal(got_w[3], weights[3])


@HOST_SCALARS
def test_clipped_step_is_min_of_trust_and_lr_times_the_update(host):
    """solo-learn's clip_lr: one step moves w by min(trust, lr) * (g + wd w), unclipped by lr * trust * (g + wd w)."""
    weights, steps, biases, bias_steps = fixed_problem()
    lr, wd, eta = 0.4, 1e-4, 0.02
    clipped, _ = run_lars(weights, steps[:1], biases, bias_steps[:1], [lr], wd, eta=eta, trust="solo_learn", host_scalars=host,
                          clip_lr=True)
    plain, _ = run_lars(weights, steps[:1], biases, bias_steps[:1], [lr], wd, eta=eta, trust="solo_learn",
                        host_scalars=host)
    for i in range(3):
        w, g = weights[i], steps[0][i]
        trust = eta * float(w.norm()) / (float(g.norm()) + wd * float(w.norm()) + 1e-8)
        update = g + wd * w
        assert torch.allclose(clipped[i], w - min(trust, lr) * update, atol=1e-6), i
        assert torch.allclose(plain[i], w - lr * trust * update, atol=1e-6), i
    assert not torch.allclose(clipped[0], plain[0])


@HOST_SCALARS
def test_lars_moco_v3_formula(host):
    weights, steps, biases, bias_steps = fixed_problem()
    lrs, wd, eta = [0.6, 0.3], 1e-6, 0.001
    got_w, got_b = run_lars(weights, steps, biases, bias_steps, lrs, wd, eta=eta, trust="moco_v3", host_scalars=host)
    for i, p in enumerate(weights):
        mu = None
        for lr, gw in zip(lrs, steps):
            p, mu = moco_v3_reference(p, gw[i], mu, lr, wd, eta, excluded=False)
        assert torch.allclose(got_w[i], p, atol=1e-6, rtol=1e-5), i
    for i, p in enumerate(biases):
        mu = None
        for lr, gb in zip(lrs, bias_steps):
            p, mu = moco_v3_reference(p, gb[i], mu, lr, 0.0, eta, excluded=True)
        assert torch.allclose(got_b[i], p, atol=1e-6), i
    # unlike solo-learn, a zero gradient still decays the weight (the update is wd * w, adapted)
    assert not torch.equal(got_w[3], weights[3])


def test_a_tensor_that_joins_later_starts_its_own_momentum_and_keeps_the_others():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([a, b], lr=0.1, momentum=0.9, eta=0.02)
    a.grad = torch.full((2, 2), 0.5)
    opt.step()  # b has no gradient yet
    buf_a, norm_a = opt.state[a]["momentum_buffer"].clone(), float(a.detach().norm())
    assert b not in opt.state or "momentum_buffer" not in opt.state[b]
    a.grad, b.grad = torch.full((2, 2), 0.5), torch.full((2, 2), 0.25)
    opt.step()
    trust_a = 0.02 * norm_a / float(torch.full((2, 2), 0.5).norm())
    assert torch.allclose(opt.state[a]["momentum_buffer"], 0.9 * buf_a + trust_a * 0.5)
    trust_b = 0.02 * 2.0 / float(torch.full((2, 2), 0.25).norm())
    assert torch.allclose(opt.state[b]["momentum_buffer"], torch.full((2, 2), trust_b * 0.25))


@HOST_SCALARS
def test_lars_first_step_and_loading_old_optimizer_states(host):
    """One step from a zero buffer moves w by lr * s * (g + wd * w) (solo-learn's clipped s); on the
    device-scalar path the step leaves that update in p.grad (no new tensor per weight)."""
    w = torch.nn.Parameter(torch.ones(3, 2))
    w.grad = torch.full((3, 2), 0.5)
    opt = LARS([w], lr=0.1, weight_decay=0.1, eta=0.02, trust="solo_learn", clip_lr=True, host_scalars=host)
    opt.step()
    trust = 0.02 * math.sqrt(6) / (0.5 * math.sqrt(6) + 0.1 * math.sqrt(6) + 1e-8)
    update = min(trust / 0.1, 1.0) * (0.5 + 0.1 * 1.0)
    if not host:
        assert torch.allclose(w.grad, torch.full((3, 2), update))
    assert torch.allclose(w.detach(), torch.full((3, 2), 1 - 0.1 * update))
    state = opt.state_dict()
    for group in state["param_groups"]:  # a state saved before lars_trust / clip_lr existed
        for key in ("trust", "clip_lr", "eps", "lars_exclude"):
            group.pop(key)
    fresh = LARS([w], lr=0.1, trust="solo_learn", clip_lr=True)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["trust"] == "moco_v3" and fresh.param_groups[0]["clip_lr"] is False
    fresh.step()


@HOST_SCALARS
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_lars_tensor_joining_later_starts_its_own_buffer(momentum, host):
    """A weight without a gradient at the first step (e.g. DINO's frozen last layer) starts its momentum
    buffer at its own first step while the others continue theirs; momentum 0 keeps no buffer."""
    g = torch.Generator().manual_seed(1)
    a0, b0 = torch.randn(5, 3, generator=g), torch.randn(4, 2, generator=g)
    grads = [(torch.randn(5, 3, generator=g), None), (torch.randn(5, 3, generator=g), torch.randn(4, 2, generator=g))]
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    opt = LARS([a, b], lr=0.3, momentum=momentum, weight_decay=1e-3, eta=0.02, trust="moco_v3", host_scalars=host)
    ref_a, ref_b, mu_a, mu_b = a0, b0, None, None
    for ga, gb in grads:
        a.grad, b.grad = ga.clone(), None if gb is None else gb.clone()
        opt.step()
        ref_a, mu_a = moco_v3_reference(ref_a, ga, mu_a, 0.3, 1e-3, 0.02, False, momentum=momentum)
        if gb is not None:
            ref_b, mu_b = moco_v3_reference(ref_b, gb, mu_b, 0.3, 1e-3, 0.02, False, momentum=momentum)
    assert torch.allclose(a.detach(), ref_a, atol=1e-6) and torch.allclose(b.detach(), ref_b, atol=1e-6)
    assert ("momentum_buffer" in opt.state[b]) == (momentum > 0)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("trust", ["moco_v3", "solo_learn"])
def test_lars_step_dispatches_a_fixed_number_of_ops_whatever_the_number_of_tensors(trust):
    """Off the CPU, one step issues group-wide torch._foreach_* ops: the op count does not grow with the
    tensors (the per-parameter loop of the references dispatched ~10 ops per tensor)."""

    def ops_of_second_step(n):
        params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n)]
        opt = LARS([{"params": params, "weight_decay": 1e-4}], lr=0.3, eta=0.02, trust=trust, clip_lr=True,
                   host_scalars=False)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            with OpCounter() as counter:
                opt.step()
        return counter.ops

    few, many = ops_of_second_step(3), ops_of_second_step(40)
    assert len(few) == len(many) < 40, many  # the per-tensor loop: ~10 x 40
    assert any("_foreach_norm" in op for op in many)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_built_sgd_and_adamw_are_fused_and_step_as_torch_default(make_cfg, name):
    """build_optimizer's SGD / AdamW use torch's fused kernels; three steps equal the per-tensor loop's."""
    cfg = make_cfg("method=simclr", f"optimizer.name={name}")
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(6, 4, generator=g), torch.randn(4, generator=g)]
    grads = [[torch.randn(6, 4, generator=g), torch.randn(4, generator=g)] for _ in range(3)]
    params = {k: [torch.nn.Parameter(x.clone()) for x in start] for k in ("ours", "loop")}
    groups = lambda ps: [{"params": ps[:1], "lr": 0.1, "weight_decay": 0.05},  # noqa: E731
                         {"params": ps[1:], "lr": 0.1, "weight_decay": 0.0}]
    ours = build_optimizer(cfg.optimizer, groups(params["ours"]))
    cls, extra = (torch.optim.SGD, {"momentum": 0.9}) if name == "sgd" else (torch.optim.AdamW, {})
    loop = cls(groups(params["loop"]), lr=0.1, foreach=False, **extra)
    assert ours.defaults["fused"] is True
    for step in grads:
        for opt, ps in ((ours, params["ours"]), (loop, params["loop"])):
            for p, grad in zip(ps, step):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(params["ours"], params["loop"]):
        assert torch.allclose(a, b, atol=1e-6)


def test_build_optimizer_passes_the_lars_variant_and_rejects_unknown_values(make_cfg):
    cfg = make_cfg("method=simclr", "optimizer.lars_trust=moco_v3", "optimizer.clip_lr=false")
    opt = build_optimizer(cfg.optimizer, [{"params": [torch.nn.Parameter(torch.ones(2, 2))], "lr": 0.1,
                                           "weight_decay": 0.0}])
    assert isinstance(opt, LARS) and opt.param_groups[0]["trust"] == "moco_v3" and not opt.param_groups[0]["clip_lr"]
    cfg.optimizer.lars_trust = "bolts"
    with pytest.raises(ConfigError) as e:
        check_optimizer_config(cfg.optimizer)
    assert "\n" not in str(e.value) and "optimizer.lars_trust" in str(e.value) and "solo_learn" in str(e.value)
