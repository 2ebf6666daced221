"""The on-device augmentation against torchvision, the references' pipeline, image by image."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from ssl_vision.augment import (CROP_TRIES, EvalTransform, MultiViewAugment, ProbeCrops, adjust_brightness,
                                adjust_contrast, adjust_hue, adjust_saturation, build_augment, random_resized_crop_boxes,
                                resized_crop)
from ssl_vision.config import ConfigError
from ssl_vision.rng import keyed_uniform

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def batch(n=8, size=40):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


# --- crop geometry ------------------------------------------------------------------------------------


def test_crop_boxes_follow_torchvision_random_resized_crop_on_a_4_3_image():
    """Area fraction and aspect ratio of 4000 boxes on a 400 x 300 original have torchvision's distribution
    (two-sample KS statistic below the 1% critical value 1.63 sqrt(2/n) = 0.036), and the outer 10% columns on
    each side are covered as often as torchvision covers them (a centre-square canvas never reached them)."""
    n, h, w = 4000, 300, 400
    torch.manual_seed(0)
    tv = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)]).double()  # (i, j, h, w)
    u = keyed_uniform(0, 0, torch.arange(n), "view:view1", 4 * CROP_TRIES)
    b = random_resized_crop_boxes(u, torch.full((n,), h), torch.full((n,), w))
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert torch.equal(b, b.round())  # integer pixel edges, as torchvision's (i, j, h, w)
    critical = 1.63 * math.sqrt(2 / n)
    assert ks_statistic(bw * bh / (h * w), tv[:, 2] * tv[:, 3] / (h * w)) < critical
    assert ks_statistic(bw / bh, tv[:, 3] / tv[:, 2]) < critical
    left, right = (b[:, 0] < 0.1 * w).double().mean(), (b[:, 2] > 0.9 * w).double().mean()
    tv_left, tv_right = (tv[:, 1] < 0.1 * w).double().mean(), ((tv[:, 1] + tv[:, 3]) > 0.9 * w).double().mean()
    assert 0.25 < tv_left < 0.35 and abs(left - tv_left) < 0.03 and abs(right - tv_right) < 0.03


def test_crop_boxes_fall_back_to_torchvisions_centre_crop():
    """No try fits (scale above what the ratio range allows on a 10:1 strip): the centre crop clamped to the
    largest allowed ratio, exactly as torchvision."""
    u = torch.rand(3, 4 * CROP_TRIES)
    b = random_resized_crop_boxes(u, torch.tensor([10, 100, 50]), torch.tensor([100, 10, 50]), (1.0, 1.0), (3 / 4, 4 / 3))
    # 10 x 100: w = round(10 * 4/3) = 13, centred; 100 x 10: h = round(10 / (3/4)) = 13; 50 x 50: the whole image
    assert b.tolist() == [[43, 0, 56, 10], [0, 43, 10, 56], [0, 0, 50, 50]]


@pytest.mark.parametrize("kind,mode", [("bilinear", InterpolationMode.BILINEAR), ("bicubic", InterpolationMode.BICUBIC)])
def test_resized_crop_equals_torchvision_crop_then_antialiased_resize(kind, mode):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 50)
    sizes = torch.tensor([[40, 50, 40, 50]] * 3)
    boxes = torch.tensor([[5.0, 3.0, 45.0, 33.0], [0.0, 0.0, 50.0, 40.0], [10.0, 12.0, 17.0, 20.0]])
    flip = torch.tensor([True, False, False])
    for size in (16, 64):  # shrinking (antialiased) and enlarging
        ours = resized_crop(x, boxes, sizes, size, flip, kind)
        ref = torch.stack([TF.resized_crop(x[i], int(b[1]), int(b[0]), int(b[3] - b[1]), int(b[2] - b[0]), [size, size],
                                           interpolation=mode, antialias=True) for i, b in enumerate(boxes)])
        ref[0] = ref[0].flip(-1)
        assert torch.allclose(ours, ref.clamp(0, 1), atol=1e-5)


def test_crops_read_only_the_image_not_the_canvas_padding():
    """A 40 x 20 image on a 40 px canvas: every crop of it is its own colour, however the padding is filled."""
    x = torch.zeros(2, 3, 40, 40)
    x[:, :, :20, :] = 0.5  # the image (rows 0-19); the rest of the canvas is 0
    sizes = torch.tensor([[20, 40, 200, 400]] * 2)
    aug = MultiViewAugment(16, {"v": {"jitter_prob": 0.0, "grayscale_prob": 0.0, "crop_scale": [0.08, 1.0]}},
                           [0.0] * 3, [1.0] * 3)
    for epoch in range(5):
        (view,) = aug(x, sizes, torch.arange(2), epoch)
        assert torch.allclose(view, torch.full_like(view, 0.5), atol=1e-6)


# --- photometric ops ----------------------------------------------------------------------------------


def test_photometric_ops_equal_torchvisions():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 12)
    f = torch.tensor([0.3, 0.9, 1.2, 1.8])
    h = torch.tensor([-0.2, -0.05, 0.1, 0.5])
    for ours, theirs, factor in ((adjust_brightness, TF.adjust_brightness, f), (adjust_contrast, TF.adjust_contrast, f),
                                 (adjust_saturation, TF.adjust_saturation, f), (adjust_hue, TF.adjust_hue, h)):
        ref = torch.stack([theirs(x[i], float(factor[i])) for i in range(4)])
        assert torch.allclose(ours(x, factor), ref, atol=2e-5), ours.__name__


def _reference_view(x, p, v, mean, std):
    """One image through the torchvision ops, in its own jitter order, with the plan's parameters."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for op in p["jitter_ops"].tolist():
        if op < 4:
            x = ops[op](x, float(p["jitter_factors"][op]))
    if p["gray"]:
        x = TF.rgb_to_grayscale(x, 3)
    if p["blur"] is not None:
        k = 2 * math.ceil(3 * v["blur_sigma"][1]) + 1
        x = TF.gaussian_blur(x, [k, k], [p["blur"], p["blur"]])
    if p["solarize"]:
        x = torch.where(x >= 0.5, 1 - x, x)
    return TF.normalize(x, mean, std)


def test_each_image_gets_torchvisions_ops_in_its_own_random_order():
    """A whole view equals torchvision's ops applied image by image with the same parameters: colour jitter in
    a random order per image (torchvision draws one per call), grayscale, blur, solarize."""
    view = {"crop_scale": [0.3, 1.0], "jitter_prob": 0.9, "grayscale_prob": 0.3, "blur_prob": 0.5, "blur_min_size": 0,
            "solarize_prob": 0.4, "brightness": 0.4, "contrast": 0.4, "saturation": 0.3, "hue": 0.1}
    aug = MultiViewAugment(16, {"v": view}, MEAN, STD)
    images, sizes, idx = batch(32, 20), torch.tensor([[20, 20, 20, 20]] * 32), torch.arange(100, 132)
    (plan,) = aug.plan(sizes, idx, epoch=3)
    (out,) = aug.apply(images, sizes, [plan])
    crops = resized_crop(images.float() / 255, plan["boxes"], sizes, 16, plan["flip"])
    orders = set()
    def members(key):
        a, b = plan["slices"][key]
        return plan["index"][a:b].tolist()

    blurred = members("blur")
    for i in range(32):
        p = {"jitter_ops": plan["jitter_ops"][i], "jitter_factors": plan["jitter_factors"][i],
             "gray": i in members("gray"), "blur": float(plan["blur_sigma"][blurred.index(i)]) if i in blurred else None,
             "solarize": i in members("solarize")}
        orders.add(tuple(p["jitter_ops"].tolist()))
        ref = _reference_view(crops[i], p, aug.views[0], MEAN, STD)
        assert torch.allclose(out[i], ref, atol=1e-4), i
    assert len(orders) > 10  # orders differ between the images of one batch


def test_views_have_configured_shape_dtype_and_range(make_cfg):
    cfg = make_cfg()
    aug = build_augment(cfg.augment, 32, MEAN, STD)
    views = aug(batch())
    assert len(views) == 2
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for v in views:
        assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32
        per_channel = v.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-4).all() and (per_channel.max(1).values <= hi + 1e-4).all()
    assert not torch.allclose(views[0], views[1])  # two random views of the same images differ


def test_a_view_set_to_null_is_left_out(make_cfg):
    """digits DINO nulls 4 of dino.yaml's 8 local views: training and ssl-vision-views see 2 x 32 + 4 x 16 px."""
    aug = build_augment(make_cfg("method=dino").augment, 32, MEAN, STD)
    assert aug.names == ["global1", "global2", "local1", "local2", "local3", "local4"]
    assert aug.sizes == [32, 32, 16, 16, 16, 16] and aug.num_global == 2


def test_simclr_defaults_follow_the_paper(make_cfg):
    assert list(make_cfg().augment.all_views.crop_scale) == [0.4, 1.0]  # digits: 8x8 images, larger crops
    v = make_cfg("data=synthetic").augment.all_views
    assert list(v.crop_scale) == [0.08, 1.0] and v.jitter_prob == 0.8 and v.grayscale_prob == 0.2
    assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.8, 0.8, 0.8, 0.2)
    assert v.blur_prob == 0.5 and v.blur_min_size == 96


def test_blur_only_on_views_of_at_least_blur_min_size(make_cfg):
    cfg = make_cfg()
    assert build_augment(cfg.augment, 32, MEAN, STD).probabilities(0)["blur"] == 0.0
    assert build_augment(cfg.augment, 96, MEAN, STD).probabilities(0)["blur"] == 0.5
    cfg2 = make_cfg("augment.all_views.blur_min_size=0")
    aug = build_augment(cfg2.augment, 32, MEAN, STD)
    assert aug.probabilities(0)["blur"] == 0.5
    plan = aug.plan(torch.tensor([[32, 32, 32, 32]] * 64), torch.arange(64))[0]
    a, b = plan["slices"]["blur"]
    assert 16 < b - a < 48 and len(plan["blur_sigma"]) == b - a


def test_per_view_settings_override_shared_ones():
    acfg = OmegaConf.create({"all_views": {"solarize_prob": 0.0},
                             "views": {"a": {}, "b": {"solarize_prob": 0.3}, "c": {"flip_prob": 0.0}}})
    aug = build_augment(acfg, 16, MEAN, STD)
    assert [aug.probabilities(i)["solarize"] for i in range(3)] == [0.0, 0.3, 0.0]
    assert [aug.probabilities(i)["flip"] for i in range(3)] == [0.5, 0.5, 0.0]
    assert len(aug(batch(4, 16))) == 3


@pytest.mark.parametrize("views,match", [
    ({"v": {"blurr_prob": 1.0}}, "blurr_prob"),
    ({"v": {"size": 64}}, "augment.views.v.size: 64 must be in 1..data.image_size"),
    ({"v": {"interpolation": "nearest"}}, "interpolation: 'nearest'; choose one of: bilinear, bicubic"),
    ({"v": {"crop_scale": [0.5, 0.2]}}, "crop_scale"),
    ({"v": {"flip_prob": 2}}, "flip_prob: 2 is not a probability"),
    ({"v": {"blur_kernel": 4}}, "blur_kernel: 4; use auto or an odd number"),
])
def test_bad_view_settings_are_one_line_errors(views, match):
    with pytest.raises(ConfigError, match=match) as e:
        MultiViewAugment(16, views, MEAN, STD)
    assert "\n" not in str(e.value)


# --- multi-crop --------------------------------------------------------------------------------------


def test_global_and_local_views_have_their_own_sizes_on_the_device(make_cfg):
    """2 x 32 px global + 4 x 16 px local views, configured in mixed order, reach training_step globals
    first with exactly those shapes, through the Lightning batch hooks."""
    import lightning as L

    from ssl_vision.data import SSLDataModule
    from ssl_vision.methods import build_method

    views = {"local1": {"size": 16, "crop_scale": [0.05, 0.4]}, "global1": {}, "local2": {"size": 16},
             "global2": {}, "local3": {"size": 16}, "local4": {"size": 16}}
    cfg = make_cfg("data=synthetic", "data.image_size=32", "data.batch_size=16", "backbone=resnet18_tiny",
                   "method.proj_hidden_dim=16")
    cfg.augment.views = views
    model = build_method(cfg, cfg.data.num_classes)
    assert model.augment.names == ["global1", "global2", "local1", "local2", "local3", "local4"]
    assert model.augment.num_global == 2
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([tuple(v.shape) for v in batch[0]])

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()])
    trainer.fit(model, datamodule=SSLDataModule(cfg.data))
    assert seen == [[(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 4]


# --- keyed draws: per sample, per rank --------------------------------------------------------------------


def test_draws_are_keyed_by_seed_epoch_sample_and_view():
    aug = MultiViewAugment(16, {"a": {}, "b": {}}, MEAN, STD, seed=0)
    sizes, idx = torch.tensor([[20, 30, 200, 300]] * 6), torch.arange(10, 16)
    boxes = lambda a, epoch, order=slice(None): [p["boxes_orig"] for p in a.plan(sizes[order], idx[order], epoch)]  # noqa: E731
    first = boxes(aug, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, boxes(aug, 0)))  # reproducible
    reordered = boxes(aug, 0, [5, 2, 0])  # the same samples in another batch: the same boxes
    assert torch.equal(reordered[0], first[0][[5, 2, 0]])
    assert not torch.equal(first[0], first[1])  # two views of one image differ
    assert not torch.equal(first[0], boxes(aug, 1)[0])  # the next epoch draws anew
    other_seed = MultiViewAugment(16, {"a": {}, "b": {}}, MEAN, STD, seed=1)
    assert not torch.equal(first[0], boxes(other_seed, 0)[0])
    u = keyed_uniform(0, 0, torch.arange(20000), "x", 3)  # uniform and uncorrelated across draws
    assert ks_statistic(u[:, 0], torch.linspace(0, 1, 20000)) < 0.015
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.03


def _rank_plans(rank, world, init_file, out_dir):
    from torch.utils.data import DistributedSampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        aug = MultiViewAugment(16, {"a": {}, "b": {}}, MEAN, STD, seed=0)
        order = list(DistributedSampler(range(64), num_replicas=world, rank=rank, seed=0))
        idx = torch.tensor(order[:8])  # this rank's first batch
        plans = aug.plan(torch.tensor([[24, 32, 240, 320]] * 8), idx, epoch=0)
        boxes = torch.stack([p["boxes_orig"] for p in plans])  # (views, 8, 4)
        gathered = [torch.empty_like(boxes) for _ in range(world)]
        dist.all_gather(gathered, boxes)
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_idx, idx)
        if rank == 0:
            torch.save({"boxes": gathered, "idx": all_idx}, os.path.join(out_dir, "plans.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_draw_different_crops_and_a_single_process_draws_the_same_per_sample(tmp_path):
    mp.spawn(_rank_plans, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    res = torch.load(tmp_path / "plans.pt")
    b0, b1 = res["boxes"]
    assert not torch.equal(b0, b1)  # the same step on two ranks: different crops
    assert (b0 != b1).any(-1).float().mean() > 0.9
    # one process holding both ranks' samples draws exactly their views (keys, not streams, decide)
    aug = MultiViewAugment(16, {"a": {}, "b": {}}, MEAN, STD, seed=0)
    idx = torch.cat(res["idx"])
    single = torch.stack([p["boxes_orig"] for p in aug.plan(torch.tensor([[24, 32, 240, 320]] * 16), idx, 0)])
    assert torch.equal(single, torch.cat([b0, b1], dim=1))


# --- evaluation views ---------------------------------------------------------------------------------------


def test_eval_transform_of_a_square_canvas_is_the_normalized_image():
    x = batch(2, 32)
    t = EvalTransform(32, MEAN, STD)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(t(x, torch.tensor([[32, 32, 32, 32]] * 2)), expected, atol=1e-6)
    # a larger square canvas is resized whole (CIFAR / STL-10 / digits are evaluated uncropped)
    small = t(batch(2, 64), torch.tensor([[64, 64, 64, 64]] * 2))
    assert small.shape == (2, 3, 32, 32)


def test_eval_transform_is_torchvisions_resize_then_centre_crop_on_a_4_3_image():
    """ImageNet's evaluation view (shorter side to 256, centre crop 224; here 32 / 0.875 and 32) of a smooth
    48 x 64 image on a 64 px canvas, equal to torchvision's up to the sub-pixel placement of the crop."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[0, :, :48] = img
    ours = EvalTransform(32, [0.0] * 3, [1.0] * 3, crop_fraction=0.875)(canvas, torch.tensor([[48, 64, 48, 64]]))
    ref = TF.center_crop(TF.resize(img, 37, antialias=True), [32, 32])  # int(32 / 0.875) = 36.57 -> 37
    assert ours.shape == (1, 3, 32, 32) and (ours[0] - ref).abs().max() < 0.02


def test_probe_crops_are_fixed_per_sample_index_and_copy():
    x, idx = batch(8, 40), torch.arange(10, 18)
    sizes = torch.tensor([[40, 40, 40, 40]] * 8)
    norm = EvalTransform(32, MEAN, STD)
    crops = ProbeCrops(norm, copy=0, seed=0, crop_scale=(0.2, 1.0), flip_prob=0.5)
    out = crops(x, sizes, idx)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    # the same sample gets the same crop in any batch composition or order (sharding over ranks)
    assert torch.allclose(crops(x[[5, 2]], sizes[:2], idx[[5, 2]]), out[[5, 2]], atol=1e-6)
    assert torch.allclose(ProbeCrops(norm, 0, 0, (0.2, 1.0))(x, sizes, idx), out)
    # another copy (or seed) crops differently, and a crop differs from the center view
    assert not torch.allclose(ProbeCrops(norm, 1, 0, (0.2, 1.0))(x, sizes, idx), out)
    assert not torch.allclose(out, norm(x, sizes))


def test_probe_crop_of_the_whole_image_without_flip_is_the_resized_image():
    x, sizes = batch(4, 32), torch.tensor([[32, 32, 32, 32]] * 4)
    norm = EvalTransform(32, MEAN, STD)
    crops = ProbeCrops(norm, 0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0)
    assert torch.allclose(crops(x, sizes, torch.arange(4)), norm(x, sizes), atol=1e-5)
    flipped = ProbeCrops(norm, 0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0)
    assert torch.allclose(flipped(x, sizes, torch.arange(4)), norm(x, sizes).flip(-1), atol=1e-5)
