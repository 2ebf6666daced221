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
    loader = [(images[:6], torch.zeros(6, dtype=torch.long), torch.arange(6)),
              (images[6:], torch.ones(6, dtype=torch.long), torch.arange(6, 12))]
    feats, labels = extract_features(backbone, loader, EvalTransform(16, [0.5] * 3, [0.5] * 3), "cpu")
    assert feats.shape == (12, dim) and labels.tolist() == [0] * 6 + [1] * 6
    assert weights_checksum(backbone) == before
    assert backbone.training  # mode restored


def test_checksum_sees_bn_statistics():
    bn = nn.BatchNorm1d(3)
    before = weights_checksum(bn)
    bn(torch.randn(4, 3))
    assert weights_checksum(bn) != before
