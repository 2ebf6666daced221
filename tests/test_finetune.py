"""Fine-tuning (``ssl-vision-finetune``) and its augmentation, against the references' formulas and timm's code.

- RandAugment on the device: every op against timm's PIL op on an image; the draws' distributions.
- Random erasing: the same boxes as timm's ``RandomErasing`` given the same draws, per sample.
- Mixup / cutmix / label smoothing: timm's ``Mixup`` targets and images as timm documents them; the losses.
- Layer-wise lr decay and the schedule: MAE's ``param_groups_lrd`` and ``adjust_learning_rate``.
- Loading a pre-trained backbone (MAE's missing / unexpected keys), the head's initialisation.
- End to end, in process: seeds + random-init twin, summary, curves, export, the final metrics; an exact
  mid-epoch resume of the MAE protocol; and one 2-process DDP run through the CLI.
"""

import csv
import json
import math
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

from ssl_vision.augment import EvalTransform, MultiViewAugment
from ssl_vision.backbones import build_backbone
from ssl_vision.config import ConfigError, conf_dir
from ssl_vision.data import SSLDataModule
from ssl_vision.evaluation import backbone_from_checkpoint, load_checkpoint
from ssl_vision.finetune.model import init_head, layer_decay_groups, load_pretrained, schedule_lr
from ssl_vision.finetune.module import build_criterion, build_mixup, numpy_seeded
from ssl_vision.finetune.run import per_device_batch, run
from ssl_vision.methods import build_method
from ssl_vision.randaugment import (ERASE_DRAWS, GEOMETRIC, OP_FUNCTIONS, RAND_INCREASING_TRANSFORMS,
                                    RAND_TRANSFORMS, RandAugment, affine, erase, erase_boxes, op_argument)
from ssl_vision.rng import keyed_uniform

PRETRAIN = ["data=synthetic", "data.num_samples=64", "data.batch_size=16", "trainer.accelerator=cpu",
            "eval.enabled=false"]
MODELS = {
    "resnet": ["method=simclr", "backbone=resnet18_tiny", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    "vit": ["method=mae", "backbone=vit_tiny", "backbone.patch_size=4", "+backbone.kwargs.depth=2",
            "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
}
FT = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
      "finetune.batch_size=16", "trainer.log_every_n_steps=1"]


def make(config_name, overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """Tiny pre-training checkpoints (one optimizer step, saved as Lightning saves them): SimCLR with a ResNet-18
    quarter width and MAE with a 2-block ViT-tiny, on 64 synthetic 16 px images (48 to train, 16 to validate)."""
    root = tmp_path_factory.mktemp("pretrained")
    paths = {}
    for name, overrides in MODELS.items():
        cfg = make("train", PRETRAIN + overrides)
        dm = SSLDataModule(cfg.data)
        dm.setup()
        L.seed_everything(0, verbose=False)
        model = build_method(cfg, dm.num_classes)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
        paths[name] = root / f"{name}.ckpt"
        trainer.save_checkpoint(paths[name])
    return paths


def finetune_cfg(checkpoint, run_dir, *overrides):
    cfg = make("finetune", [f"checkpoint={checkpoint}", *FT, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


# --- RandAugment ------------------------------------------------------------------------------------------------


def test_every_randaugment_op_matches_timms_pil_op(monkeypatch):
    """Each op of timm's two RandAugment sets at magnitudes 3, 9, 10 and both signs, on a 24 px 8-bit image: the
    ops on 8-bit levels are exact, the others within PIL's rounding (<= 1.5 levels of 255, 0.6 on average);
    the geometric ops are PIL's affine transform with its bicubic and bilinear filters and the fill colour."""
    from timm.data import auto_augment as aa

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:24]
    smooth = np.stack([128 + 100 * np.sin(xx / 4 + c) * np.cos(yy / 5 - c) for c in range(3)], -1)
    img = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    fill = (124, 116, 104)  # timm's img_mean for ImageNet's mean
    exact = {"Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd"}
    for kind, pil_filter in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        hparams = {"translate_const": 10, "img_mean": fill, "interpolation": pil_filter}
        names = GEOMETRIC if kind == "bilinear" else sorted(set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS))
        for name in names:
            for magnitude in (3.0, 9.0, 10.0):
                for negate in (False, True):
                    monkeypatch.setattr(aa.random, "random", lambda n=negate: 0.9 if n else 0.1)  # the sign draw
                    arg = op_argument(name, torch.tensor([magnitude], dtype=torch.float64), torch.tensor([negate]), 24)
                    if name.startswith("Posterize") and int(arg) == 0:  # Pillow 13 refuses 0 bits; older: all 0
                        ref = np.zeros_like(img, dtype=np.float64)
                    else:
                        ref = np.asarray(aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(
                            Image.fromarray(img))).astype(np.float64)
                    if name in GEOMETRIC:
                        out = affine(x.clone(), arg.float(), torch.tensor(fill) / 255.0, kind)
                    else:
                        out = OP_FUNCTIONS[name](x.clone(), arg.float())
                    diff = np.abs(out[0].permute(1, 2, 0).double().numpy() * 255 - ref)
                    case = (name, kind, magnitude, negate)
                    if name in exact:
                        assert diff.max() < 1e-3, case
                    else:
                        assert diff.max() <= 1.5 and diff.mean() <= 0.6, (case, diff.max(), diff.mean())
    monkeypatch.undo()
    # the geometric ops really move the image, and pixels leaving it take the fill colour
    moved = affine(x.clone(), op_argument("TranslateXRel", torch.tensor([9.0], dtype=torch.float64),
                                          torch.tensor([False]), 24).float(), torch.tensor(fill) / 255.0)
    assert torch.allclose(moved[0, :, :, -5:], (torch.tensor(fill) / 255.0).view(3, 1, 1).expand(3, 24, 5))


def test_randaugment_draws_follow_timms_distributions():
    """rand-m9-mstd0.5-inc1 over 30000 keyed samples: each layer applies an op with p = 0.5, each of the 15 ops
    equally often (the 5 geometric ones share one pass), magnitudes N(9, 0.5) clipped to [0, 10]; mstd > 100 is
    uniform in [0, m]; a sample's draws do not depend on its batch; timm's weighted sets are refused."""
    n = 30000
    ra = RandAugment("rand-m9-mstd0.5-inc1", 16, (128, 128, 128))
    assert ra.ops == RAND_INCREASING_TRANSFORMS and ra.settings["num_layers"] == 2 and ra.settings["prob"] == 0.5
    plan = ra.plan(keyed_uniform(0, 0, torch.arange(n), "ra", ra.num_draws))
    for t in range(2):
        counts = {name: plan["slices"].get(f"{t}:{name}", (0, 0)) for name in (*ra.ops, "affine")}
        counts = {k: b - a for k, (a, b) in counts.items()}
        applied = sum(counts.values())
        assert abs(applied / n - 0.5) < 0.015
        for name in ra.ops:
            if name not in GEOMETRIC:
                assert abs(counts[name] / applied - 1 / 15) < 0.01, name
        assert abs(counts["affine"] / applied - 5 / 15) < 0.015
    u = keyed_uniform(1, 0, torch.arange(n), "mag", 2).double()
    mags = ra.magnitudes(u[:, 0], u[:, 1])
    reference = np.clip(np.random.default_rng(0).normal(9.0, 0.5, 200000), 0, 10)
    assert abs(float(mags.mean()) - reference.mean()) < 0.01 and abs(float(mags.std()) - reference.std()) < 0.01
    assert float(mags.max()) == 10.0 and float(mags.min()) > 6
    uniform = RandAugment("rand-m9-mstd101", 16, (0, 0, 0)).magnitudes(u[:, 0], u[:, 1])
    assert abs(float(uniform.mean()) - 4.5) < 0.05 and float(uniform.max()) <= 9
    # keyed per sample: sample 5 is augmented (and its erasing box drawn) the same in any batch
    view = {"v": {"randaugment": "rand-m9-mstd0.5-inc1", "flip_prob": 0.5}}
    aug = MultiViewAugment(16, view, [0.5] * 3, [0.5] * 3, seed=3)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    a = aug(images, indexes=torch.tensor([5, 6]))[0][0]
    b = aug(images[[1, 0]], indexes=torch.tensor([9, 5]))[0][1]
    assert torch.equal(a, b) and not torch.equal(a, aug(images, indexes=torch.tensor([7, 6]))[0][0])
    erasing = MultiViewAugment(16, {"v": {"erase_prob": 1.0}}, [0.5] * 3, [0.5] * 3, seed=3)
    sizes = torch.tensor([[16, 16, 16, 16]] * 2)
    p1, p2 = (erasing.plan(sizes, torch.tensor(i))[0] for i in ([5, 6], [9, 5]))
    assert torch.equal(p1["erase_boxes"][0], p2["erase_boxes"][1]) and len(p1["erase_index"]) == 2
    for bad in ("rand-m9-tweights", "auto-m9", "rand-q3"):
        with pytest.raises(ConfigError, match="augment.views.v.randaugment"):
            MultiViewAugment(16, {"v": {"randaugment": bad}}, [0.5] * 3, [0.5] * 3)


def test_random_erasing_draws_timms_boxes_per_sample(monkeypatch):
    """Given the same per-sample draws, timm's RandomErasing on a batch (a loop over its samples: each sample its
    own apply draw and box) and ``erase_boxes`` + ``erase`` change exactly the same pixels; boxes differ per sample."""
    import timm.data.random_erasing as re_mod

    b, h, w = 24, 20, 28
    u = keyed_uniform(0, 0, torch.arange(b), "erase", ERASE_DRAWS)

    class Replay:  # serves timm's calls from the rows of u, in timm's order: random, (uniform, uniform)+, randint x2
        def __init__(self):
            self.row, self.rows = -1, u.double().tolist()

        def random(self):
            self.row, self.attempt, self.pos = self.row + 1, 0, 0
            return self.rows[self.row][0]

        def _next(self):
            value = self.rows[self.row][1 + 4 * self.attempt + self.pos]
            self.pos += 1
            return value

        def uniform(self, lo, hi):
            if self.pos == 2:  # the previous try did not fit
                self.attempt, self.pos = self.attempt + 1, 0
            return lo + (hi - lo) * self._next()

        def randint(self, lo, hi):
            return lo + int(self._next() * (hi - lo + 1))

    monkeypatch.setattr(re_mod, "random", Replay())
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))
    theirs = re_mod.RandomErasing(probability=0.5, mode="pixel", max_count=1, device="cpu")(x.clone())
    boxes = erase_boxes(u, h, w, 0.5)
    index = torch.nonzero(boxes[:, 2] > 0)[:, 0]
    ours = erase(x.clone(), boxes[index], index)
    assert torch.equal(theirs != x, ours != x)
    assert 4 <= len(index) <= 20 and len({tuple(r) for r in boxes[index].tolist()}) == len(index)
    changed = ours != x
    assert abs(float(ours[changed].std()) - 1.0) < 0.1  # per-pixel N(0, 1) noise


# --- mixup / cutmix / label smoothing ---------------------------------------------------------------------------


def test_mixup_cutmix_and_label_smoothing_change_targets_as_timm_documents():
    """timm's Mixup as the MAE preset builds it: targets lam * smooth(y) + (1 - lam) * smooth(y flipped), with
    smooth(y) = (1 - s) one_hot + s / K; mixup blends the images with the flipped batch, cutmix pastes one box
    of it (lam = 1 - box area); both occur (switch_prob 0.5). The seeded call is reproducible and leaves NumPy's
    global state alone. The losses: soft-target cross-entropy under mixup, else label smoothing = cross-entropy
    on the smoothed targets."""
    k, s = 5, 0.1
    ft = make("finetune", ["finetune=mae_vit_base"]).finetune
    mixup = build_mixup(ft, k)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.mode,
            mixup.label_smoothing) == (0.8, 1.0, 1.0, 0.5, "batch", 0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 12, 12, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    smooth = F.one_hot(y, k).float() * (1 - s) + s / k
    kinds = set()
    state = np.random.get_state()
    for seed in range(12):
        with numpy_seeded(seed):
            mixed, target = mixup(x.clone(), y)
        with numpy_seeded(seed):
            again, _ = mixup(x.clone(), y)
        assert torch.equal(mixed, again)
        lam = float(target[0, y[0]] - smooth.flip(0)[0, y[0]]) / float(smooth[0, y[0]] - smooth.flip(0)[0, y[0]])
        assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)
        assert torch.allclose(target.sum(1), torch.ones(8))
        pasted = (mixed == x.flip(0)) & (mixed != x)
        if ((mixed == x) | pasted).all() and pasted.any():  # cutmix: one box from the flipped batch, lam = 1 - area
            kinds.add("cutmix")
            rows, cols = pasted[0, 0].any(1).nonzero()[:, 0], pasted[0, 0].any(0).nonzero()[:, 0]
            box = torch.zeros(12, 12, dtype=torch.bool)
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(mixed, torch.where(box, x.flip(0), x))
            assert abs(lam - (1 - float(box.sum()) / 144)) < 1e-6
        else:
            kinds.add("mixup")
            assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    assert kinds == {"mixup", "cutmix"}
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(state, after))

    logits = torch.randn(8, k, generator=g)
    soft = build_criterion(ft, mixup)
    assert torch.allclose(soft(logits, target), -(target * logits.log_softmax(-1)).sum(-1).mean())
    plain = make("finetune", ["finetune=mae_vit_base", "finetune.mixup=null"]).finetune
    smoothing = build_criterion(plain, None)
    assert torch.allclose(smoothing(logits, y), -(smooth * logits.log_softmax(-1)).sum(-1).mean(), atol=1e-6)
    simclr = make("finetune", ["finetune=resnet_sgd"]).finetune
    assert isinstance(build_criterion(simclr, None), torch.nn.CrossEntropyLoss)


# --- layer decay, schedule, head ------------------------------------------------------------------------------


def test_layer_decay_groups_are_maes_param_groups_lrd():
    """facebookresearch/mae util/lr_decay.py: block i at decay^(depth - i), patch embed / cls / pos at
    decay^(depth + 1), fc_norm and head at 1; no weight decay on 1-D parameters, pos_embed and cls_token."""
    depth, decay, wd = 3, 0.65, 0.05
    model, _ = build_backbone("vit_tiny", 16, patch_size=4, kwargs={"depth": depth, "num_classes": 5,
                                                                      "global_pool": "avg"})
    groups = layer_decay_groups(model, wd, decay, set(model.no_weight_decay()))
    seen = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = (g["lr_scale"], g["weight_decay"])
    names = dict(model.named_parameters())
    assert len(seen) == len(names)
    for name, p in names.items():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            scale = decay ** (depth + 1)
        elif name.startswith("blocks."):
            scale = decay ** (depth - int(name.split(".")[1]))
        else:
            assert name.startswith(("fc_norm", "head")), name
            scale = 1.0
        no_wd = p.ndim == 1 or name in ("pos_embed", "cls_token")
        assert seen[id(p)] == (pytest.approx(scale), 0.0 if no_wd else wd), name


def test_schedule_is_maes_lr_sched_and_simclrs_cosine_decay():
    """MAE util/lr_sched.py at fractional epochs (warm-up from 0, half cosine to min_lr); without warm-up and
    min_lr it is tf.train.cosine_decay(lr, step, total)."""
    def mae(epoch, lr=2e-3, warmup=5, epochs=100, min_lr=1e-6):
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
    for epoch in (0.0, 0.3, 2.5, 4.999, 5.0, 37.25, 99.9, 100.0):
        assert schedule_lr(epoch, 2e-3, 100, 5, 1e-6) == pytest.approx(mae(epoch), rel=1e-12, abs=1e-15)
    total = 180
    for step in (0, 1, 90, 179):
        assert schedule_lr(step / 3, 0.8, 60) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * step / total)))


def test_pretrained_backbone_loads_as_mae_does_and_heads_start_as_the_references(pretrained):
    """MAE main_finetune.py: with global pooling only head.* and fc_norm.* are missing and the final norm is
    dropped; with the [CLS] token only the head is new. The head: trunc_normal(std 2e-5) / zero bias (MAE) or
    zeros (SimCLR)."""
    ckpt = load_checkpoint(pretrained["vit"])
    encoder = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    for pool, missing, unexpected in (("avg", ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"],
                                       ["norm.bias", "norm.weight"]), ("token", ["head.bias", "head.weight"], [])):
        kwargs = {"depth": 2, "num_classes": 4, "global_pool": pool}
        model, _ = build_backbone("vit_tiny", 16, patch_size=4, kwargs=kwargs)
        assert load_pretrained(model, ckpt["state_dict"]) == {"missing": missing, "unexpected": unexpected}
        assert torch.equal(model.blocks[1].mlp.fc2.weight, encoder["blocks.1.mlp.fc2.weight"])
        assert torch.equal(model.pos_embed, encoder["pos_embed"])
    torch.manual_seed(0)
    init_head(model, "trunc_normal", 2e-5)
    assert abs(float(model.head.weight.detach().std()) - 2e-5) < 2e-6 and not model.head.bias.any()
    resnet, _ = build_backbone("resnet18_tiny", 16, kwargs={"num_classes": 4})
    assert load_pretrained(resnet, load_checkpoint(pretrained["resnet"])["state_dict"])["missing"] == \
        ["fc.bias", "fc.weight"]
    init_head(resnet, "zeros")
    assert not resnet.fc.weight.any() and not resnet.fc.bias.any()
    other, _ = build_backbone("vit_tiny", 16, patch_size=4, kwargs={"depth": 2, "num_classes": 4, "embed_dim": 96,
                                                                      "num_heads": 3})
    with pytest.raises(RuntimeError):
        load_pretrained(other, ckpt["state_dict"])


# --- end to end ----------------------------------------------------------------------------------------------------


def _rows(path, key):
    with open(path, newline="") as f:
        return [(int(r["epoch"]), int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def _evaluate(checkpoint, data_cfg):
    """Top-1 of a fine-tune checkpoint's classifier on the validation set, in one process, from scratch."""
    ckpt = load_checkpoint(checkpoint)
    model, _ = backbone_from_checkpoint(ckpt)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    dm = SSLDataModule(data_cfg)
    dm.setup()
    transform = EvalTransform(int(cfg.data.image_size), list(cfg.data.mean), list(cfg.data.std), 1.0, "bicubic")
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for images, sizes, labels, _ in dm.val_dataloader():
            correct += int((model(transform(images, sizes)).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def test_finetune_seeds_random_init_summary_curves_and_export(pretrained, tmp_path):
    """Two seeds, each with a random-init twin, one epoch of the digits protocol (warm-up: 1 epoch) on the tiny
    SimCLR checkpoint: the summary holds mean, std and per-seed values of both; each fine-tune has its checkpoint,
    metrics (top-1 / top-5), result and curves; the final top-1 is what the saved classifier scores when evaluated
    afresh; the lr follows the schedule; the export reloads with plain timm; a second call finds the work done."""
    from ssl_vision.export import load_exported

    out = tmp_path / "ft"
    cfg = finetune_cfg(pretrained["resnet"], out, "finetune.seeds=[0,1]", "finetune.random_init=true",
                       "trainer.max_epochs=1")
    summary = run(cfg)
    written = json.loads((out / "finetune_summary.json").read_text())
    assert written["finetune_top1_per_seed"] == summary["finetune_top1_per_seed"]
    for prefix in ("finetune", "random_init_finetune"):
        values = summary[f"{prefix}_top1_per_seed"]
        assert len(values) == 2 and summary[f"{prefix}_top1"] == pytest.approx(np.mean(values))
        assert summary[f"{prefix}_top1_std"] == pytest.approx(np.std(values))  # population std, as MAE reports
        assert 0 <= summary[f"{prefix}_top5"] <= 1
    assert summary["steps"] == 3 and summary["global_batch_size"] == 16 and summary["seeds"] == [0, 1]
    assert (out / "finetune_curves.png").is_file()
    data_cfg = load_checkpoint(pretrained["resnet"])["hyper_parameters"]["cfg"]["data"]
    for seed in (0, 1):
        for sub, init in (("", "pretrained"), ("random_init", "random")):
            job = out / f"seed{seed}" / sub
            result = json.loads((job / "finetune_result.json").read_text())
            assert result["init"] == init and result["seed"] == seed
            assert OmegaConf.load(job / "config.yaml").finetune.init == init
            top1 = _rows(job / "metrics.csv", "val/top1")
            assert [e for e, _, _ in top1] == [0] and len(_rows(job / "metrics.csv", "val/top5")) == 1
            assert result["top1"] == pytest.approx(top1[-1][2]) == pytest.approx(
                _evaluate(job / "checkpoints" / "last.ckpt", OmegaConf.create(data_cfg)))
            assert (job / "finetune_curves.png").is_file()
            for _, step, lr in _rows(job / "metrics.csv", "train/lr"):  # logged after the step: schedule at step
                assert lr == pytest.approx(schedule_lr(step / 3, 0.1 * 16 / 256, 1, 1, 0.0), rel=1e-5)
    # the export: plain timm with the sidecar's kwargs gives the checkpoint's logits
    job = out / "seed0"
    meta = json.loads((job / "finetuned.json").read_text())
    assert meta["create_model_kwargs"]["num_classes"] == 4
    exported = load_exported(job / "finetuned.safetensors")
    model, _ = backbone_from_checkpoint(load_checkpoint(job / "checkpoints" / "last.ckpt"))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (exported(x) - model.eval()(x)).abs().max() < 1e-5
    assert not (out / "seed0" / "random_init" / "finetuned.safetensors").exists()
    stamp = (job / "metrics.csv").stat().st_mtime_ns
    again = run(cfg)
    assert again["finetune_top1_per_seed"] == summary["finetune_top1_per_seed"]
    assert (job / "metrics.csv").stat().st_mtime_ns == stamp  # finished fine-tunes are not run again


def test_mae_protocol_resumes_mid_epoch_exactly(pretrained, tmp_path):
    """The MAE preset (layer decay, drop path, RandAugment, random erasing, mixup / cutmix) on the tiny MAE
    checkpoint: stopped after 4 of 6 steps (mid-epoch, last.ckpt there) and continued with the same command,
    it ends with the weights and per-step losses of the uninterrupted fine-tune. The optimizer's groups carry
    MAE's layer scales."""
    common = ["finetune=mae_vit_base", "finetune.warmup_epochs=1", "trainer.max_epochs=2", "plots=false",
              "export=false", "checkpointing.every_n_steps=2", "trainer.deterministic=true"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(finetune_cfg(pretrained["vit"], straight, *common))
    partial = run(finetune_cfg(pretrained["vit"], stopped, *common, "trainer.max_steps=4"))
    assert partial["steps"] == 4
    run(finetune_cfg(pretrained["vit"], stopped, *common))
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key], b["state_dict"][key], atol=1e-6), key
    la = {s: v for _, s, v in _rows(straight / "metrics.csv", "train/loss_step")}
    lb = {s: v for _, s, v in _rows(stopped / "metrics.csv", "train/loss_step")}
    assert sorted(la) == sorted(lb) == list(range(6)) and all(abs(la[s] - lb[s]) < 1e-5 for s in la)
    assert [e for e, _, _ in _rows(straight / "metrics.csv", "val/top1")] == [0, 1]  # top-1 every epoch
    scales = sorted({round(g["lr_scale"], 10) for g in a["optimizer_states"][0]["param_groups"]})
    assert scales == sorted({round(0.65 ** e, 10) for e in (3, 2, 1, 0)})  # patch embed etc., block 0, block 1, head


def test_finetune_on_two_ddp_processes_counts_every_validation_image_once(pretrained, tmp_path):
    """The CLI under trainer=ddp with 2 gloo processes: the global batch splits over the ranks, one summary, and
    the validation top-1 (19 images: one rank gets 10, the other 9, no repeats) equals a 1-process evaluation
    of the saved classifier."""
    out = tmp_path / "ddp"
    data = ["data=synthetic", "data.num_samples=75"]  # 56 training images, 19 to validate
    r = subprocess.run([sys.executable, "-m", "ssl_vision.finetune", f"checkpoint={pretrained['resnet']}", *FT, *data,
                        "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1", "plots=false",
                        f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 16 and summary["steps"] == 3
    assert r.stdout.count('"world_size": 2') == 1 and OmegaConf.load(out / "config.yaml").data.batch_size == 8
    data_cfg = OmegaConf.load(out / "config.yaml").data
    assert _val_count(data_cfg) == 19
    assert summary["finetune_top1"] == pytest.approx(_evaluate(out / "checkpoints" / "last.ckpt", data_cfg))


def _val_count(data_cfg):
    dm = SSLDataModule(data_cfg)
    dm.setup()
    return len(dm.val_set)


def test_finetune_settings_are_checked_with_one_line_errors(pretrained, tmp_path):
    for overrides, match in ((["finetune.optimizer.name=lars"], "finetune.optimizer.name"),
                             (["finetune.seeds=[0,0]"], "finetune.seeds"),
                             (["finetune.layer_decay=1.5"], "finetune.layer_decay"),
                             (["finetune=mae_vit_base", "finetune.batch_size=15"], "must be even"),
                             (["finetune.pool=cls"], "finetune.pool")):
        with pytest.raises(ConfigError, match=match):
            run(finetune_cfg(pretrained["resnet"], tmp_path / "bad", *overrides))
    with pytest.raises(ConfigError, match="checkpoint: not set"):
        run(make("finetune", FT))
    with pytest.raises(ConfigError, match="does not split over 3 device"):
        per_device_batch(16, 3, 1, False)
    assert per_device_batch(1024, 8, 4, True) == 32
