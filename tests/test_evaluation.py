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
    assert seen[0].shape == (2, n, dim) and torch.equal(seen[0], seen[1])
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
