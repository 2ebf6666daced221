"""Distributed correctness on the CPU: 2 gloo ranks with B/2 samples each must equal 1 rank with B.

Each method takes one optimizer step from the same initial weights on the same augmented views;
the averaged loss, the updated weights (and EMA encoder, and the MoCo v2 queue) must match the
single-process step on the concatenated batch. Gradients are averaged over ranks exactly as DDP
does. BatchNorm layers are put in eval mode: torch has no CPU SyncBatchNorm, and per-rank batch
statistics would differ from full-batch ones by construction (on GPUs, trainer=ddp converts them).
The offline probes must give the same accuracy on 2 ranks as on 1, embedding every image once over
the ranks and running the probes on rank 0 only. The same launch checks the online probe on a rank
without labels, the MoCo v2 queue's agreement across ranks, that a non-finite loss on one rank
stops both with one message, and that the online kNN over per-rank banks equals one bank.
"""

import os
import sys
from pathlib import Path

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from torch import nn

from ssl_vision.config import conf_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from gather_check import sgd_step  # noqa: E402 - the GPU lane's step (tools/gather_check.py), compared here too

B = 8
COMMON = ["data=synthetic", "data.image_size=16", "backbone=vit_tiny", "backbone.patch_size=4",
          "+backbone.kwargs.depth=2", "eval.linear.epochs=5"]
METHODS = {
    "simclr": ["method=simclr", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    "moco_v2": ["method=moco_v2", "method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.queue_size=16"],
    "moco_v3": ["method=moco_v3", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                "method.pred_hidden_dim=32"],
    "mae": ["method=mae", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
}


def make_cfg(overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="train", overrides=COMMON + overrides)


def fixed_inputs():
    g = torch.Generator().manual_seed(123)
    views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
    noise = torch.rand(B, 16, generator=g)  # MAE's masking noise, one row per sample
    return views, noise


def rank_share(views, rank, world):
    """This rank's B / world samples of every view."""
    n = B // world
    return [v[rank * n:(rank + 1) * n] for v in views]


def frozen_bn_model(overrides):
    """The method of ``overrides`` (seeded), its BatchNorms on running statistics (the same on every rank)."""
    from ssl_vision.methods import build_method

    torch.manual_seed(0)
    model = build_method(make_cfg(overrides), num_classes=0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def one_step(name, rank=0, world=1):
    """One SGD step of ``name`` on this rank's share of the fixed batch; returns (loss, state)."""
    from ssl_vision.methods import mae

    views, noise = fixed_inputs()
    n = B // world
    local, model = rank_share(views, rank, world), frozen_bn_model(METHODS[name])
    original = mae.random_masking
    mae.random_masking = lambda x, ratio, **kw: original(x, ratio, noise=noise[rank * n:(rank + 1) * n])
    try:
        out = model.forward_views(local)
    finally:
        mae.random_masking = original
    loss = sgd_step(model, out["loss"], world)  # what DDP does: gradients (and the loss) averaged over the ranks
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


def probe_metrics(perturb_statistics=False):
    """``evaluate_backbone`` of a fixed random backbone: (metrics, validation features or None, the dataset
    indexes this rank embedded in each extraction, the ranks that ran the probes). ``perturb_statistics``:
    this rank's BatchNorm statistics differ from rank 0's (evaluation must use rank 0's, the checkpoint's)."""
    import ssl_vision.evaluation as E
    from ssl_vision.augment import EvalTransform
    from ssl_vision.backbones import build_backbone
    from ssl_vision.data import SSLDataModule
    from ssl_vision.distributed import rank

    cfg = make_cfg(METHODS["simclr"])
    dm = SSLDataModule(cfg.data)
    dm.setup()
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18_tiny", 16)
    if perturb_statistics:
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    seen, probes = [], []
    shard, evaluate_features = E.shard, E.evaluate_features

    def counted(loader):
        seen.append([])
        for batch in shard(loader):
            seen[-1].extend(batch[-1].tolist())  # the indexes come last in every loader batch
            yield batch

    def recorded(*args, **kwargs):
        probes.append(rank())
        return evaluate_features(*args, **kwargs)

    E.shard, E.evaluate_features = counted, recorded
    try:
        metrics, features = E.evaluate_backbone(backbone, dm, EvalTransform(16, [0.5] * 3, [0.5] * 3), cfg.eval,
                                                return_features=True)
    finally:
        E.shard, E.evaluate_features = shard, evaluate_features
    return metrics, features, seen, probes


# labels of the fixed batch (-1: unlabelled), split in halves over 2 ranks
PROBE_LABELS = {"labels_on_one_rank": [0, 1, -1, 2, -1, -1, -1, -1], "equal_counts": [0, -1, 1, -1, 2, -1, -1, 0]}


def probe_step(labels, rank=0, world=1):
    """The online probe on this rank's share of fixed features: (local loss, labelled count, local
    gradients), and the gradients averaged over ranks as DDP does. Its BatchNorm is in eval mode, like
    every BatchNorm of this harness (see the module docstring)."""
    from ssl_vision.methods import build_method

    torch.manual_seed(0)
    model = build_method(make_cfg(METHODS["simclr"]), num_classes=3)
    model.probe.eval()
    feats = torch.randn(B, model.feat_dim, generator=torch.Generator().manual_seed(7))
    n = B // world
    share = slice(rank * n, (rank + 1) * n)
    loss, _, labelled = model.online_probe(feats[share], torch.tensor(labels)[share])
    loss.backward()
    local = [p.grad.clone() for p in model.probe.parameters()]  # None (an error here) = unused by DDP
    averaged = [g.clone() for g in local]
    if world > 1:
        for g in averaged:
            dist.all_reduce(g)
            g /= world
    return loss.detach(), int(labelled), local, averaged


def rank_agreement(rank):
    """Checks that need the other rank: (the non-finite check's message on this rank; this rank's probe
    BatchNorm mean after ``on_validation_epoch_start``, which takes rank 0's)."""
    from ssl_vision.methods import build_method

    model = build_method(make_cfg(METHODS["simclr"]), num_classes=3)
    model._record_non_finite(torch.tensor(float("nan") if rank == 1 else 1.0))  # rank 1 only, at step 0
    model._record_non_finite(torch.tensor(2.0))
    try:
        model.check_non_finite()
        message = None
    except FloatingPointError as e:
        message = str(e)
    model.probe[0].running_mean.fill_(float(rank + 1))
    model.on_validation_epoch_start()
    return message, model.probe[0].running_mean.clone()


def empty_batch_step(rank):
    """Rank 1's batch is empty (every file unreadable): it trains on the zero-weighted stand-in, so both
    ranks run SimCLR's gathers with equal shapes and finish the step; returns (loss, its batch size)."""
    from ssl_vision.methods import build_method

    torch.manual_seed(0)
    model = build_method(make_cfg(METHODS["simclr"] + ["data.batch_size=4"]), num_classes=3)
    views, _ = fixed_inputs()
    labels = torch.tensor([0, 1, 2, 0])
    if rank == 1:
        views, labels = model._stand_in([v[:0] for v in views])
    else:
        views = [v[:4] for v in views]
    out = model.forward_views(views)
    loss = out["loss"] + model.online_probe(out["feats"], labels)[0]
    if rank == 1:
        loss = loss * 0.0
    loss.backward()
    return loss.detach(), len(labels)


def online_knn_accuracy(rank=0, world=1):
    """The online kNN's top-1 with this rank's share of a fixed epoch: each training step's batch split over the
    ranks, the validation set split by Lightning's distributed sampler (which repeats a sample to even the
    ranks out); without a cap on the bank, and with a cap that drops the older rows."""
    from torch.utils.data import DistributedSampler

    from ssl_vision.online_knn import OnlineKNN

    from .test_online_knn import knn_data

    bank_x, bank_y, qx, qy = knn_data(steps=4, batch=8, queries=11)
    n = 8 // world
    queries = list(DistributedSampler(range(11), num_replicas=world, rank=rank, shuffle=False)) if world > 1 \
        else list(range(11))
    out = []
    for cap in (None, 16):
        knn = OnlineKNN(3, k=6, temperature=0.1, max_bank=cap)
        for bx, by in zip(bank_x, bank_y):
            knn.add_bank(bx[rank * n:(rank + 1) * n], by[rank * n:(rank + 1) * n])
        idx = torch.tensor(queries)
        knn.add_queries(qx[idx], qy[idx], idx)
        out.append(float(knn.compute("cpu")))
    return out, len(queries)


def _worker(rank, world, init_file, out_dir):
    from ssl_vision.distributed import gather_no_grad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: one_step(name, rank, world) for name in METHODS}
        queue, ptr = (results["moco_v2"][1][k] for k in ("queue", "queue_ptr"))
        results["queue_on_ranks"] = (gather_no_grad(queue[None]), gather_no_grad(ptr[None]))
        results["probe"] = probe_metrics(perturb_statistics=rank == 1)
        results["online_probe"] = {case: probe_step(labels, rank, world) for case, labels in PROBE_LABELS.items()}
        results["agreement"] = rank_agreement(rank)
        results["empty_batch"] = empty_batch_step(rank)
        results["online_knn"] = online_knn_accuracy(rank, world)
        torch.save(results, os.path.join(out_dir, f"ddp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_for_every_method(tmp_path):
    """One 2-process launch checks everything that touches ranks in the methods and the evaluation."""
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = [torch.load(tmp_path / f"ddp{r}.pt", weights_only=False) for r in range(2)]
    for name in METHODS:
        loss, state = one_step(name)
        d_loss, d_state = ddp[0][name]
        assert torch.allclose(loss, d_loss, atol=1e-5), (name, loss, d_loss)
        assert state.keys() == d_state.keys()
        for key in state:
            assert torch.allclose(state[key].float(), d_state[key].float(), atol=1e-5), (name, key)
    # MoCo v2: the queue and its pointer are the same on both ranks by construction (no DDP broadcast)
    queues, ptrs = ddp[0]["queue_on_ranks"]
    assert torch.equal(queues[0], queues[1]) and torch.equal(ptrs[0], ptrs[1])
    assert int(ptrs[0]) == B  # one global batch enqueued

    # offline evaluation: the same metrics on both ranks as in one process, although rank 1's BatchNorm
    # statistics differed; every image embedded once over the ranks; probes and features on rank 0 only
    single, (val_x, val_y), single_seen, single_probes = probe_metrics()
    (m0, f0, seen0, probes0), (m1, f1, seen1, probes1) = ddp[0]["probe"], ddp[1]["probe"]
    assert m0 == m1 == single
    assert torch.equal(f0[0], val_x) and torch.equal(f0[1], val_y) and f1 is None
    assert probes0 == single_probes == [0] and probes1 == []
    from ssl_vision.evaluation import augment_copies

    cfg = make_cfg(METHODS["simclr"])
    copies = augment_copies(cfg.eval, len(single_seen[0]), len(single_seen[1]), 128)
    assert copies == 4  # eval.linear.augment_copies=auto: the data is small
    assert len(seen0) == len(seen1) == len(single_seen) == 2 + copies  # train, val, augmented copies of train
    for a, b, full in zip(seen0, seen1, single_seen):
        assert sorted(a + b) == sorted(full) == list(range(len(full))) and abs(len(a) - len(b)) <= 1

    # online probe: a rank without labels contributes a zero, finite loss and zero gradients, yet every
    # probe parameter gets a gradient on every rank; with equal label counts, 2 ranks = 1 rank
    (l0, n0, g0, _), (l1, n1, g1, _) = (ddp[r]["online_probe"]["labels_on_one_rank"] for r in range(2))
    single_loss, single_n, single_grads, _ = probe_step(PROBE_LABELS["labels_on_one_rank"])
    assert (n0, n1, single_n) == (3, 0, 3) and float(l1) == 0.0 and torch.isfinite(l0)
    assert torch.allclose(l0, single_loss) and all(not g.any() for g in g1)
    assert all(torch.allclose(a, b) for a, b in zip(g0, single_grads))
    _, _, _, averaged = ddp[0]["online_probe"]["equal_counts"]
    _, _, reference, _ = probe_step(PROBE_LABELS["equal_counts"])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(averaged, reference))

    # a NaN on rank 1 alone: both ranks raise the same message; validation takes rank 0's statistics
    (msg0, mean0), (msg1, mean1) = ddp[0]["agreement"], ddp[1]["agreement"]
    assert msg0 == msg1 == "non-finite loss nan at step 0 (rank 1 of 2)"
    assert torch.equal(mean0, torch.ones_like(mean0)) and torch.equal(mean1, mean0)
    # an empty batch on rank 1 (data.batch_size per rank): both finish the step, rank 1 adds nothing
    (loss0, n0), (loss1, n1) = ddp[0]["empty_batch"], ddp[1]["empty_batch"]
    assert torch.isfinite(loss0) and float(loss1) == 0.0 and n0 == n1 == 4

    # online kNN: each rank banks half of every step and gets 6 of the 11 queries (one repeated). Without a cap both
    # ranks get the accuracy of one process holding the whole epoch. With max_bank=16 each rank keeps its own newest
    # 8 labelled rows (one process: the newest 16): both ranks vote over the union of those, as the formula says
    from .test_online_knn import knn_data, reference_top1

    (acc0, q0), (acc1, q1) = ddp[0]["online_knn"], ddp[1]["online_knn"]
    single_acc, _ = online_knn_accuracy()
    assert q0 == q1 == 6 and acc0 == acc1 and acc0[0] == single_acc[0]
    bank_x, bank_y, qx, qy = knn_data(steps=4, batch=8, queries=11)
    flat_x, flat_y = bank_x.view(-1, 8), bank_y.view(-1)

    def newest_labelled(rows, n):  # the last n labelled of these bank rows, in the order they were banked
        return rows[flat_y[rows] >= 0][-n:]

    newest = newest_labelled(torch.arange(32), 16)
    per_rank = torch.cat([newest_labelled(torch.tensor([s * 8 + r * 4 + j for s in range(4) for j in range(4)]), 8)
                          for r in range(2)])  # rank r banked columns r*4..r*4+3 of each step
    assert single_acc == pytest.approx([reference_top1(flat_x, flat_y, qx, qy, 3, 6, 0.1),
                                        reference_top1(flat_x[newest], flat_y[newest], qx, qy, 3, 6, 0.1)])
    assert acc0[1] == pytest.approx(reference_top1(flat_x[per_rank], flat_y[per_rank], qx, qy, 3, 6, 0.1))
    assert single_acc[0] != single_acc[1]  # the cap mattered


def test_cli_ddp_run_on_two_cpu_processes(tmp_path):
    """The real launcher path, as a user of the semi-supervised protocol runs it: Lightning starts 2 gloo
    processes with 1% of the labels (most per-rank batches hold none, so the online probe must run on
    every rank without a label); training and both evaluations finish; rank 0 alone writes the summary;
    the lr follows the global batch; the random-init baseline and the final evaluation each embed every
    image exactly once over the two ranks, rank 0 alone runs the probes, and the end-of-run probes equal a
    1-process evaluation of the saved backbone. The probe trains on steps 0 and 2 only (probe.every_n_steps=2):
    DDP's gradient reduction still finishes on step 1, where the probe is left out."""
    import json
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from ssl_vision.data import SSLDataModule
    from ssl_vision.evaluation import backbone_from_checkpoint, evaluate_backbone, load_checkpoint
    from ssl_vision.methods import build_method

    run, record = tmp_path / "run", tmp_path / "record"
    record.mkdir()
    script = Path(__file__).with_name("ddp_instrumented.py")
    r = subprocess.run([sys.executable, str(script), "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                        "data=synthetic", "data.label_fraction=0.01", "backbone=resnet18_tiny", "trainer.max_epochs=1",
                        "eval.linear.epochs=5", "eval.linear.augment_copies=2", "plots=false", "probe.every_n_steps=2",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "SSLV_TEST_RECORD": str(record)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("summary.json")] == [run.relative_to(tmp_path) / "summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and r.stdout.count('"linear_probe_top1"') == 1  # printed by rank 0 only
    assert summary["steps"] == 384 // (2 * 64)  # 384 training images, 64 per rank per step, drop_last
    assert 0.0 <= summary["online_probe_top1"] <= 1.0 and 0.0 <= summary["random_init_knn_top1"] <= 1.0
    assert 0.0 <= summary["online_knn_top1"] <= 1.0  # the online kNN's collectives ran on both ranks
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    lrs = {g["name"]: g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert lrs["decay"] == lrs["no_decay"] == pytest.approx(0.4 * 128 / 256)  # base lr x global batch / 256
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    dm = SSLDataModule(cfg.data)
    dm.setup()
    backbone, _ = backbone_from_checkpoint(ckpt)
    single = evaluate_backbone(backbone, dm, build_method(cfg, dm.num_classes).eval_transform, cfg.eval)
    for key in ("linear_probe_top1", "linear_probe_top5", "knn_top1"):
        assert summary[key] == single[key], key

    # each evaluation (baseline, final) extracts: probe-train center crops, validation, 2 crop copies
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    train_n, val_n = (len(loader.dataset) for loader in dm.probe_dataloaders())
    sizes = [train_n, val_n, train_n, train_n] * 2
    assert len(ranks[0]["extractions"]) == len(ranks[1]["extractions"]) == len(sizes)
    for call, n in enumerate(sizes):
        shares = [ranks[0]["extractions"][call], ranks[1]["extractions"][call]]
        assert sorted(shares[0] + shares[1]) == list(range(n)), call  # every image once over the ranks
        assert abs(len(shares[0]) - len(shares[1])) <= 1 and min(map(len, shares)) > 0  # sharded
    # the probes ran twice (baseline, final), on rank 0 only, on the whole probe-train set
    assert ranks[1]["probes"] == [] and [p["rank"] for p in ranks[0]["probes"]] == [0, 0]
    assert all(p["train_features"][0] == train_n for p in ranks[0]["probes"])

# --- BYOL, SimSiam, Barlow Twins, VICReg, DINO: 2 ranks x B/2 == 1 rank x B (loss, weights, EMA teacher,
# DINO centre); and the same step with per-rank statistics (the gathers replaced by the identity) must NOT
# match, which shows that Barlow Twins' and VICReg's batch statistics and DINO's centre are global ------

NEW_METHODS = {
    "byol": ["method=byol", "method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32"],
    "simsiam": ["method=simsiam", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                "method.pred_hidden_dim=8"],
    "barlow_twins": ["method=barlow_twins", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    "vicreg": ["method=vicreg", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    # 2 global views of 16 px + 2 local views of 8 px; the ViT interpolates its position embedding
    "dino": ["method=dino", "method.hidden_dim=32", "method.bottleneck_dim=16", "method.out_dim=64",
             "+backbone.kwargs.dynamic_img_size=true", "augment.views.local1.size=8", "augment.views.local2.size=8",
             "method.norm_last_layer=false", "method.freeze_last_layer=0"]
            + [f"~augment.views.local{i}" for i in range(3, 9)],
}
PER_RANK_GATHER = {"barlow_twins": "gather_with_grad", "vicreg": "gather_with_grad", "dino": "gather_no_grad"}


def one_step_new(name, rank=0, world=1, per_rank=False):
    """One SGD step of ``name`` on this rank's share of fixed views; ``per_rank``: with the method's gather
    replaced by the identity (statistics of this rank's samples only)."""
    import importlib

    g = torch.Generator().manual_seed(7)
    sizes = (16, 16, 8, 8) if name == "dino" else (16, 16)
    views = [torch.randn(B, 3, s, s, generator=g) for s in sizes]
    local, model = rank_share(views, rank, world), frozen_bn_model(NEW_METHODS[name])
    module = importlib.import_module(f"ssl_vision.methods.{name}")
    gather = PER_RANK_GATHER.get(name)
    original = getattr(module, gather) if gather else None
    if per_rank:
        setattr(module, gather, lambda x: x)
    try:
        out = model.forward_views(local)
    finally:
        if per_rank:
            setattr(module, gather, original)
    loss = sgd_step(model, out["loss"], world)  # DINO: with its per-parameter clipping (and last-layer freeze)
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker_new(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: one_step_new(name, rank, world) for name in NEW_METHODS}
        results.update({f"{name}/per_rank": one_step_new(name, rank, world, per_rank=True) for name in PER_RANK_GATHER})
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp_new.pt"))
    finally:
        dist.destroy_process_group()


def _max_difference(a, b):
    (loss_a, state_a), (loss_b, state_b) = a, b
    return max([float((loss_a - loss_b).abs())] + [float((state_a[k].float() - state_b[k].float()).abs().max())
                                                   for k in state_a])


def test_two_ranks_equal_one_rank_for_byol_simsiam_barlow_twins_vicreg_dino(tmp_path):
    mp.spawn(_worker_new, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp_new.pt", weights_only=False)
    for name in NEW_METHODS:
        single = one_step_new(name)
        assert single[1].keys() == ddp[name][1].keys()
        assert _max_difference(single, ddp[name]) < 1e-5, name
        if name in ("byol", "dino"):  # the EMA target is its own network: not the online one after a step
            online, target = ("backbone", "momentum_backbone") if name == "byol" else ("student_backbone", "backbone")
            key = "blocks.0.mlp.fc1.weight"
            assert not torch.allclose(single[1][f"{online}.{key}"], single[1][f"{target}.{key}"], atol=1e-4)
        if name == "dino":
            assert single[1]["center"].abs().sum() > 0 and torch.allclose(single[1]["center"], ddp[name][1]["center"],
                                                                       atol=1e-7)
    # statistics of each rank's own samples give another step: the comparison above would catch them
    for name in PER_RANK_GATHER:
        assert _max_difference(one_step_new(name), ddp[f"{name}/per_rank"]) > 1e-3, name
