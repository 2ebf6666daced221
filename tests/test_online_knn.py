"""Online kNN during pre-training (ssl_vision/online_knn.py): the weighted vote against a reference written
from the formula, the bank's cap, and a tiny in-process run that logs it to metrics.csv from exactly the
first view's training features of the due epoch and the validation features. The 2-rank equality is in
tests/test_ddp.py (the shared multi-process launch)."""

import pytest
import torch
import torch.nn.functional as F

from ssl_vision.online_knn import OnlineKNN

from .conftest import TINY


def reference_top1(bank_x, bank_y, query_x, query_y, num_classes, k, temperature):
    """Wu et al. 2018 / solo-learn's cosine kNN from the formula: unlabelled bank rows (-1) left out; the k
    most cosine-similar rows each add exp(sim / T) to their class; the class with most votes is predicted."""
    labelled = bank_y >= 0
    bx, by = F.normalize(bank_x[labelled], dim=1), bank_y[labelled]
    correct = 0
    for q, y in zip(F.normalize(query_x, dim=1), query_y):
        sim = bx @ q
        top = sim.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes)
        for i in top:
            votes[by[i]] += torch.exp(sim[i] / temperature)
        correct += int(votes.argmax() == y)
    return correct / len(query_y)


def knn_data(steps=4, batch=8, queries=11, dim=8, classes=3, seed=0):
    """Class clusters: ``steps`` training batches (some labels -1) and labelled queries with dataset indexes."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (steps * batch + queries,), generator=g)
    x = centers[y] + 0.9 * torch.randn(len(y), dim, generator=g)
    bank_y = y[:steps * batch].clone()
    bank_y[torch.rand(len(bank_y), generator=g) < 0.25] = -1
    return x[:steps * batch].view(steps, batch, dim), bank_y.view(steps, batch), x[steps * batch:], y[steps * batch:]


def test_online_knn_votes_as_the_formula_on_labelled_bank_rows_only():
    bank_x, bank_y, qx, qy = knn_data()
    knn = OnlineKNN(3, k=5, temperature=0.1, max_bank=None)
    for bx, by in zip(bank_x, bank_y):
        knn.add_bank(bx, by)
    knn.add_queries(qx[:6], qy[:6], torch.arange(6))
    knn.add_queries(qx[6:], qy[6:], torch.arange(6, 11))
    expected = reference_top1(bank_x.view(-1, 8), bank_y.view(-1), qx, qy, 3, 5, 0.1)
    assert 0.3 < expected < 1.0
    assert float(knn.compute("cpu")) == pytest.approx(expected)
    assert knn.query_x == []  # queries belong to one validation
    # a query seen twice (Lightning's distributed sampler pads with repeats) counts once
    knn.add_queries(qx, qy, torch.arange(11))
    knn.add_queries(qx[:1], qy[:1], torch.tensor([0]))
    assert float(knn.compute("cpu")) == pytest.approx(expected)
    knn.reset_bank()
    knn.add_queries(qx, qy, torch.arange(11))
    assert knn.compute("cpu") is None  # nothing banked: nothing to log


def test_online_knn_bank_keeps_the_newest_labelled_rows_within_its_cap():
    bank_x, bank_y, qx, qy = knn_data(steps=10, batch=8)
    cap = 16
    knn = OnlineKNN(3, k=5, temperature=0.1, max_bank=cap)
    for bx, by in zip(bank_x, bank_y):
        knn.add_bank(bx, by)
        assert knn.bank_rows <= cap + cap // 4  # compacted once 25% over the cap
    labelled = torch.nonzero(bank_y.view(-1) >= 0).squeeze(1)[-cap:]  # the newest 16 labelled rows
    kept_x, kept_y = bank_x.view(-1, 8)[labelled], bank_y.view(-1)[labelled]
    knn.add_queries(qx, qy, torch.arange(11))
    assert float(knn.compute("cpu")) == pytest.approx(reference_top1(kept_x, kept_y, qx, qy, 3, 5, 0.1))
    assert len(torch.cat(knn.bank_y)) <= cap + cap // 4


def test_online_knn_config(make_cfg):
    from ssl_vision.config import ConfigError

    cfg = make_cfg()
    knn = OnlineKNN.from_config(cfg, 10)
    assert (knn.k, knn.temperature, knn.every_n_epochs, knn.max_bank) == (20, 0.07, 1, 131072)
    assert OnlineKNN.from_config(cfg, 0) is None  # unlabelled data
    assert OnlineKNN.from_config(make_cfg("eval.online_knn.every_n_epochs=0"), 10) is None
    every3 = OnlineKNN.from_config(make_cfg("eval.online_knn.every_n_epochs=3"), 10)
    assert [e for e in range(9) if every3.due(e)] == [2, 5, 8]
    with pytest.raises(ConfigError, match="eval.online_knn.k: 0 is out of range"):
        OnlineKNN.from_config(make_cfg("eval.online_knn.k=0"), 10)


def test_a_run_logs_online_knn_from_the_first_views_of_the_due_epoch(tmp_path, make_cfg, monkeypatch):
    """Two epochs, every_n_epochs=2: epoch 0 banks nothing; epoch 1 banks each training step's first-view
    features (what forward_views returned), queries the validation features, and logs val/knn_top1 = the
    formula on exactly those; metrics.csv and the training-curves figure carry it, the summary reports it."""
    from ssl_vision import plots
    from ssl_vision.methods.simclr import SimCLR
    from ssl_vision.train import run

    forwarded, banked, queried = [], [], []
    real_forward, real_bank, real_queries = SimCLR.forward_views, OnlineKNN.add_bank, OnlineKNN.add_queries

    def forward_views(self, views):
        out = real_forward(self, views)
        forwarded.append((self.current_epoch, out["feats"].detach().clone()))
        return out

    def add_bank(self, feats, labels):
        banked.append((feats.detach().clone(), labels.clone()))
        return real_bank(self, feats, labels)

    def add_queries(self, feats, labels, indexes):
        queried.append((feats.detach().clone(), labels.clone(), indexes.clone()))
        return real_queries(self, feats, labels, indexes)

    monkeypatch.setattr(SimCLR, "forward_views", forward_views)
    monkeypatch.setattr(OnlineKNN, "add_bank", add_bank)
    monkeypatch.setattr(OnlineKNN, "add_queries", add_queries)
    monkeypatch.chdir(tmp_path)
    summary = run(make_cfg(*TINY, "trainer.max_epochs=2", "data.num_samples=64", "data.batch_size=16",
                           "eval.online_knn.every_n_epochs=2", "eval.online_knn.k=5", "eval.random_init_baseline=false",
                           "eval.linear.epochs=1", "eval.knn.k=[5]", "plots=false", "+run_dir=run"))
    second = [f for epoch, f in forwarded if epoch == 1]
    assert len(forwarded) == 6 and len(second) == len(banked) == 3  # 48 training images / 16, per epoch
    assert all(torch.equal(f, b) for f, (b, _) in zip(second, banked))  # the first view's features, no extra pass
    val_n = 16
    assert sorted(torch.cat([i for _, _, i in queried]).tolist()) == list(range(val_n))  # validation of epoch 1 only
    bank_x, bank_y = torch.cat([b for b, _ in banked]), torch.cat([y for _, y in banked])
    qx, qy = torch.cat([q for q, _, _ in queried]), torch.cat([y for _, y, _ in queried])
    expected = reference_top1(bank_x, bank_y, qx, qy, 4, 5, 0.07)

    cols = plots._read_columns(tmp_path / "run" / "metrics.csv")
    epochs, values = plots._curve(cols, "val/knn_top1", 1)
    assert epochs == [1] and values[0] == pytest.approx(expected, abs=1e-6)
    assert summary["online_knn_top1"] == pytest.approx(expected, abs=1e-6)
    fig = plots.training_curves_figure(tmp_path / "run" / "metrics.csv")
    _, labels = fig.axes[1].get_legend_handles_labels()
    assert "kNN (val)" in labels and "probe (val)" in labels
