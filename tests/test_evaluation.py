import pytest
import torch
from torch import nn

from ssl_vision.backbones import build_backbone
from ssl_vision.evaluation import extract_features, knn_scores, linear_probe, weights_checksum
from ssl_vision.augment import EvalTransform


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    y = torch.arange(200) % 4
    x = centers[y] + torch.randn(200, 16, generator=g)
    res = linear_probe(x[:150], y[:150], x[150:], y[150:], 4, epochs=30)
    assert res["top1"] == 1.0 and res["top5"] == 1.0


def test_linear_probe_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 8, generator=g), torch.randint(0, 3, (100,), generator=g)
    a = linear_probe(x[:80], y[:80], x[80:], y[80:], 3, epochs=10, seed=3)
    b = linear_probe(x[:80], y[:80], x[80:], y[80:], 3, epochs=10, seed=3)
    assert a == b


def test_knn_weights_votes_by_exp_similarity():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    scores = knn_scores(train, labels, query, 2, k=2, temperature=0.5)
    q = query / query.norm()
    s = (train / train.norm(dim=1, keepdim=True)) @ q[0]
    expected = torch.tensor([[torch.exp(s[0] / 0.5), torch.exp(s[2] / 0.5)]])  # k=2 nearest: rows 0 and 2
    assert torch.allclose(scores, expected, atol=1e-5)


def test_feature_extraction_does_not_change_backbone_weights_or_bn_stats():
    backbone, dim = build_backbone("resnet18_tiny", 16)
    backbone.train()
    before = weights_checksum(backbone)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    sizes = torch.tensor([[16, 16, 16, 16]] * 6)
    loader = [(images[:6], sizes, torch.zeros(6, dtype=torch.long), torch.arange(6)),
              (images[6:], sizes, torch.ones(6, dtype=torch.long), torch.arange(6, 12))]
    feats, labels = extract_features(backbone, loader, EvalTransform(16, [0.5] * 3, [0.5] * 3), "cpu")
    assert feats.shape == (12, dim) and labels.tolist() == [0] * 6 + [1] * 6
    assert weights_checksum(backbone) == before
    assert backbone.training  # mode restored


def test_checksum_sees_bn_statistics():
    bn = nn.BatchNorm1d(3)
    before = weights_checksum(bn)
    bn(torch.randn(4, 3))
    assert weights_checksum(bn) != before


def test_linear_probe_on_copies_trains_on_copy_epoch_mod_c():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    one = linear_probe(x[:40], y[:40], x[40:], y[40:], 3, epochs=6, seed=1)
    # identical copies: the same training as on the features themselves (standardized over copies)
    same = linear_probe(torch.stack([x[:40]] * 3), y[:40], x[40:], y[40:], 3, epochs=6, seed=1)
    assert same == one
    # the copies are used: a useless second copy changes the result
    noisy = torch.stack([x[:40], torch.randn(40, 8, generator=g) * 10])
    assert linear_probe(noisy, y[:40], x[40:], y[40:], 3, epochs=6, seed=1) != one


def test_linear_head_trains_on_augmented_copies_and_knn_on_center_crops(make_cfg, monkeypatch):
    import ssl_vision.evaluation as E
    from ssl_vision.data import SSLDataModule

    seen = []
    real = E.linear_probe
    monkeypatch.setattr(E, "linear_probe", lambda train_x, *a, **k: seen.append(train_x) or real(train_x, *a, **k))
    cfg = make_cfg("data=synthetic", "eval.linear.epochs=2", "eval.linear.augment_copies=2")
    dm = SSLDataModule(cfg.data)
    dm.setup()
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_tiny", 16)
    t = EvalTransform(16, [0.5] * 3, [0.5] * 3)
    a = E.evaluate_backbone(backbone, dm, t, cfg.eval)
    assert a == E.evaluate_backbone(backbone, dm, t, cfg.eval)  # deterministic
    n = len(dm.probe_train_set)
    assert torch.stack(seen[0]).shape == (2, n, dim) and torch.equal(torch.stack(seen[0]), torch.stack(seen[1]))
    assert not torch.allclose(seen[0][0], seen[0][1])  # two different crops of every image
    center, _ = E.extract_features(backbone, dm.probe_dataloaders(64)[0], t, "cpu")
    assert not torch.allclose(seen[0][0], center)
    cfg.eval.linear.augment_copies = 0
    b = E.evaluate_backbone(backbone, dm, t, cfg.eval)
    assert torch.allclose(seen[2], center)  # no copies: the head trains on the center crops
    assert b["knn_top1"] == a["knn_top1"]  # the kNN bank is the center crops either way


def test_probe_uses_the_runs_eval_settings_with_command_line_eval_keys_on_top(make_cfg):
    from ssl_vision.probe import probe_eval_config

    train_cfg = make_cfg()  # digits: the probe's crops are 0.4-1 without flips
    probe_cfg = make_cfg(config_name="probe")
    ecfg = probe_eval_config(train_cfg, probe_cfg, ["checkpoint=x", "eval.linear.epochs=7", "+eval.knn.temperature=0.1"])
    assert list(ecfg.linear.crop_scale) == [0.4, 1.0] and ecfg.linear.flip_prob == 0.0
    assert ecfg.linear.epochs == 7 and ecfg.knn.temperature == 0.1
    other = make_cfg("data=synthetic", config_name="probe")  # another data set: the default protocol
    assert list(probe_eval_config(train_cfg, other, []).linear.crop_scale) == [0.08, 1.0]


# --- probes on the device, chunked: the same results as the plain in-memory CPU probe ------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_linear_probe(train_x, train_y, val_x, val_y, num_classes, *, epochs, lr, batch_size, seed, optimizer,
                           momentum, weight_decay, schedule, interval, warmup_epochs, milestones, gamma, norm,
                           init_std, drop_last, scale_lr=False, eta=0.001, lars_trust="moco_v3"):
    """The probe as it ran before the device path: every feature in memory on the CPU, standardized as a
    whole with torch.mean / torch.std, one batch of rows indexed per step, accuracy with torchmetrics."""
    from torchmetrics.classification import MulticlassAccuracy

    from ssl_vision.evaluation import probe_head, probe_lr_schedule
    from ssl_vision.optim import LARS

    g = torch.Generator().manual_seed(seed)
    copies = train_x if train_x.ndim == 3 else train_x[None]
    vx = val_x
    if norm == "standardize":
        flat = copies.reshape(-1, copies.shape[-1])
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        copies, vx = (copies - mean) / std, (val_x - mean) / std
    n = copies.shape[1]
    head = probe_head(copies.shape[-1], num_classes, norm, init_std, g)
    base_lr = lr * batch_size / 256 if scale_lr else lr
    if optimizer == "lars":
        opt = LARS([{"params": [head[-1].weight], "weight_decay": weight_decay},
                    {"params": [head[-1].bias], "weight_decay": 0.0, "lars_exclude": True}],
                   lr=base_lr, momentum=momentum, eta=eta, trust=lars_trust)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=momentum, weight_decay=weight_decay)
    steps = n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
    if norm == "batchnorm" and steps > 1 and n - (steps - 1) * batch_size == 1:
        steps -= 1
    lrs = probe_lr_schedule(base_lr, epochs, steps, schedule, interval, warmup_epochs, milestones, gamma)
    head.train()
    for epoch in range(epochs):
        tx, order = copies[epoch % len(copies)], torch.randperm(n, generator=g)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lrs[epoch * steps + i]
            loss = torch.nn.functional.cross_entropy(head(tx[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        logits = head(vx)
    return {f"top{k}": float(MulticlassAccuracy(num_classes, top_k=k, average="micro")(logits, val_y)) for k in (1, 5)}


def noisy_features(n=360, m=120, dim=24, classes=8, copies=0, seed=0):
    """Overlapping class clusters (accuracy well inside (0, 1)), with a large shared mean (like ViT features)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.arange(n + m) % classes
    x = centers[y] + torch.randn(n + m, dim, generator=g) * 2 + 5
    train = x[:n] if not copies else torch.stack([x[:n] + 0.5 * torch.randn(n, dim, generator=g) for _ in range(copies)])
    return train, y[:n], x[n:], y[n:]


PROTOCOLS = {
    "default": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", interval="step",
                    warmup_epochs=0, milestones=(60, 80), gamma=0.1, norm="standardize", init_std=0.01,
                    drop_last=False),
    "mae_linprobe": dict(optimizer="lars", lr=20.0, momentum=0.9, weight_decay=0.0, schedule="cosine",
                         interval="step", warmup_epochs=2, milestones=(60, 80), gamma=0.1, norm="batchnorm",
                         init_std=0.01, drop_last=True, scale_lr=True),
    "solo_linear": dict(optimizer="sgd", lr=0.3, momentum=0.9, weight_decay=0.0, schedule="step", interval="epoch",
                        warmup_epochs=0, milestones=(3, 5), gamma=0.1, norm="none", init_std=None, drop_last=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_device_probe_in_chunks_equals_the_in_memory_cpu_probe(protocol, device):
    """Each eval preset's protocol, the head trained from features streamed to ``device`` in chunks of one
    batch (and in one chunk), on 2 augmented copies: top-1 / top-5 within 0.002 of the plain CPU probe."""
    train_x, train_y, val_x, val_y = noisy_features(copies=2)
    opts = dict(PROTOCOLS[protocol], epochs=6, batch_size=32, seed=3)
    ref = reference_linear_probe(train_x, train_y, val_x, val_y, 8, **opts)
    assert 0.2 < ref["top1"] < 0.95  # a probe with room to differ
    one_batch = 32 * 24 * 4 / 2**20  # eval.chunk_mb holding exactly one batch of rows
    for chunk_mb in (one_batch, 3.3 * one_batch, 512):
        got = linear_probe(list(train_x), train_y, val_x, val_y, 8, device=device, chunk_mb=chunk_mb, **opts)
        assert abs(got["top1"] - ref["top1"]) <= 0.002 and abs(got["top5"] - ref["top5"]) <= 0.002, (chunk_mb, got, ref)


def reference_knn_votes(train_x, train_y, val_x, num_classes, k, temperature):
    """Wu et al. 2018 from the formula, densely: cosine similarity to every bank row, the k largest,
    each adding exp(sim / T) to its class."""
    sim = torch.nn.functional.normalize(val_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(val_x), num_classes)
    for q in range(len(val_x)):
        for s, i in zip(top[q], idx[q]):
            votes[q, train_y[i]] += torch.exp(s / temperature)
    return votes


@pytest.mark.parametrize("device", DEVICES)
def test_knn_streamed_through_the_device_in_chunks_equals_the_dense_formula(device):
    from ssl_vision.evaluation import knn_accuracy

    train_x, train_y, val_x, val_y = noisy_features(n=300, m=70, dim=16)
    tiny = 16 * 16 * 4 / 2**20  # chunks of 16 bank rows, similarity tiles of 16 queries
    for k in (5, 20):
        ref = reference_knn_votes(train_x, train_y, val_x, 8, k, 0.07)
        for chunk_mb in (tiny, 512):
            votes = knn_scores(train_x, train_y, val_x, 8, k=k, temperature=0.07, device=device, chunk_mb=chunk_mb)
            assert torch.allclose(votes, ref, rtol=1e-4, atol=1e-6), (k, chunk_mb)
    expected = {k: float((reference_knn_votes(train_x, train_y, val_x, 8, k, 0.07).argmax(1) == val_y).float().mean())
                for k in (5, 20)}
    assert 0.2 < expected[20] < 0.95
    assert knn_accuracy(train_x, train_y, val_x, val_y, 8, [20, 5], 0.07, device, tiny) == pytest.approx(expected, abs=1e-9)


def test_extraction_in_chunks_is_the_same_and_in_dataset_order():
    backbone, dim = build_backbone("resnet18_tiny", 16)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g)
    sizes = torch.tensor([[16, 16, 16, 16]] * 10)
    order = torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 4, 6])  # a loader in another order than the dataset's
    loader = [(images[order[i:i + 3]], sizes[:len(order[i:i + 3])], order[i:i + 3] % 2, order[i:i + 3])
              for i in range(0, 10, 3)]
    t = EvalTransform(16, [0.5] * 3, [0.5] * 3)
    whole, labels = extract_features(backbone, loader, t, "cpu", chunk_mb=512)
    per_batch, labels2 = extract_features(backbone, loader, t, "cpu", chunk_mb=1e-6)  # one flush per batch
    backbone.eval()
    with torch.no_grad():
        direct = backbone(t(images, sizes))
    assert torch.allclose(whole, direct, atol=1e-5) and torch.equal(whole, per_batch)
    assert labels.tolist() == labels2.tolist() == [i % 2 for i in range(10)]


# --- memory of the augmented copies -----------------------------------------------------------------------


def test_augment_copies_fit_the_feature_memory_or_fail_at_once_with_the_figure(make_cfg):
    from ssl_vision.config import ConfigError
    from ssl_vision.evaluation import augment_copies, probe_feature_bytes

    n, m, d = 1_281_167, 50_000, 2048  # ImageNet-1k train / val, ResNet-50
    assert probe_feature_bytes(n, m, d, 0) == 4 * d * (n + m) == 10_904_920_064  # center crops + validation
    assert probe_feature_bytes(n, 0, d, 1) - probe_feature_bytes(n, 0, d, 0) == 10_495_320_064  # one copy
    ecfg = make_cfg().eval
    assert ecfg.linear.augment_copies == "auto" and ecfg.feature_memory_gb == 24
    assert augment_copies(ecfg, n, m, d) == 1  # 10.90 + 10.50 GB fit in 24, 10.90 + 2 x 10.50 do not
    assert augment_copies(ecfg, 126_689, 5_000, 2048) == 4  # ImageNet-100: 4 copies, 5.2 GB
    assert augment_copies(ecfg, n, m, 768) == 4  # ViT-B on ImageNet-1k: 20.5 GB
    ecfg.linear.augment_copies = 4
    with pytest.raises(ConfigError) as e:
        augment_copies(ecfg, n, m, d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("eval.linear.augment_copies: 4 augmented copies")
    assert "need 52.89 GB" in msg and "eval.linear.augment_copies=1" in msg and "eval.feature_memory_gb to 52.89" in msg
    ecfg.feature_memory_gb = 10
    with pytest.raises(ConfigError, match=r"^eval.feature_memory_gb: .* need 10.90 GB, more than 10; raise"):
        augment_copies(ecfg, n, m, d)
    ecfg.feature_memory_gb = None  # no limit
    assert augment_copies(ecfg, n, m, d) == 4
    for bad in ("many", -1, 1.5):
        ecfg.linear.augment_copies = bad
        with pytest.raises(ConfigError, match="eval.linear.augment_copies: .* is not 'auto' or a whole number"):
            augment_copies(ecfg, n, m, d)


def test_too_many_copies_stop_the_run_before_training(tmp_path, make_cfg, monkeypatch):
    from ssl_vision.config import ConfigError
    from ssl_vision.train import run

    from .conftest import TINY

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="eval.linear.augment_copies: 4 augmented copies of 384 x 128"):
        run(make_cfg(*TINY, "eval.linear.augment_copies=4", "eval.feature_memory_gb=0.0008", "+run_dir=run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


# --- seeds -------------------------------------------------------------------------------------------------


def test_seeds_rerun_the_head_on_the_same_features_and_report_mean_and_std(make_cfg, monkeypatch):
    import statistics

    import ssl_vision.evaluation as E
    from ssl_vision.config import ConfigError
    from ssl_vision.data import SSLDataModule

    train_x, train_y, val_x, val_y = noisy_features()
    ecfg = make_cfg("eval.linear.epochs=3", "eval.seeds=[0,1,2]").eval
    out = E.evaluate_features(train_x, train_y, val_x, val_y, 8, ecfg)
    single = [linear_probe(train_x, train_y, val_x, val_y, 8, seed=s, **E.linear_probe_options(ecfg.linear))
              for s in (0, 1, 2)]
    assert out["linear_probe_seeds"] == [0, 1, 2]
    for key in ("top1", "top5"):
        values = [r[key] for r in single]
        assert out[f"linear_probe_{key}_seeds"] == values
        assert out[f"linear_probe_{key}_mean"] == out[f"linear_probe_{key}"] == pytest.approx(statistics.fmean(values))
        assert out[f"linear_probe_{key}_std"] == pytest.approx(statistics.stdev(values))  # n - 1
    assert out["linear_probe_top1_std"] > 0 and len(set(out["linear_probe_top1_seeds"])) > 1
    assert "linear_probe_top1_std" not in E.evaluate_features(train_x, train_y, val_x, val_y, 8,
                                                              make_cfg("eval.linear.epochs=3").eval)

    # through evaluate_backbone: the features are extracted once whatever the number of seeds
    calls = []
    real = E.extract_features
    monkeypatch.setattr(E, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = make_cfg("data=synthetic", "eval.linear.epochs=2", "eval.linear.augment_copies=1", "eval.seeds=[4,5]")
    dm = SSLDataModule(cfg.data)
    dm.setup()
    backbone, _ = build_backbone("resnet18_tiny", 16)
    metrics = E.evaluate_backbone(backbone, dm, EvalTransform(16, [0.5] * 3, [0.5] * 3), cfg.eval)
    assert len(calls) == 3  # train center crops, validation, one augmented copy
    assert metrics["linear_probe_seeds"] == [4, 5] and len(metrics["linear_probe_top1_seeds"]) == 2
    for bad in ("[]", "3", "[a]"):
        with pytest.raises(ConfigError, match="eval.seeds: .* is not a non-empty list of integers"):
            E.probe_seeds(make_cfg(f"eval.seeds={bad}").eval)
