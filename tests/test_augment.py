import pytest
import torch
from omegaconf import OmegaConf

from ssl_vision.augment import EvalTransform, MultiViewAugment, ProbeCrops, build_augment
from ssl_vision.config import ConfigError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def batch(n=8, size=40):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


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


def test_simclr_defaults_follow_the_paper(make_cfg):
    assert list(make_cfg().augment.all_views.crop_scale) == [0.4, 1.0]  # digits: 8x8 images, larger crops
    v = make_cfg("data=synthetic").augment.all_views
    assert list(v.crop_scale) == [0.08, 1.0] and v.jitter_prob == 0.8 and v.grayscale_prob == 0.2
    assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.8, 0.8, 0.8, 0.2)
    assert v.blur_prob == 0.5 and v.blur_min_size == 96


def _has_blur(pipeline):
    return any(type(m).__name__ == "RandomGaussianBlur" for m in pipeline)


def test_blur_only_on_images_of_at_least_blur_min_size(make_cfg):
    cfg = make_cfg()
    assert not _has_blur(build_augment(cfg.augment, 32, MEAN, STD).pipelines[0])
    assert _has_blur(build_augment(cfg.augment, 96, MEAN, STD).pipelines[0])
    cfg2 = make_cfg("augment.all_views.blur_min_size=0")
    assert _has_blur(build_augment(cfg2.augment, 32, MEAN, STD).pipelines[0])


def test_per_view_settings_override_shared_ones():
    acfg = OmegaConf.create({"all_views": {"solarize_prob": 0.0},
                             "views": {"a": {}, "b": {"solarize_prob": 0.3}, "c": {"flip_prob": 0.0}}})
    aug = build_augment(acfg, 16, MEAN, STD)
    names = [[type(m).__name__ for m in p] for p in aug.pipelines]
    assert "RandomSolarize" not in names[0] and "RandomSolarize" in names[1]
    assert "RandomHorizontalFlip" not in names[2]
    assert len(aug(batch(4, 16))) == 3


def test_unknown_view_setting_is_rejected():
    with pytest.raises(ConfigError, match="blurr_prob"):
        MultiViewAugment(16, {"v": {"blurr_prob": 1.0}}, MEAN, STD)


def test_eval_transform_is_deterministic_center_crop():
    x = batch(2, 40)
    t = EvalTransform(32, MEAN, STD)
    out = t(x)
    assert out.shape == (2, 3, 32, 32) and torch.equal(out, t(x))
    expected = (x[:, :, 4:36, 4:36].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_probe_crops_are_fixed_per_sample_index_and_copy():
    x, idx = batch(8, 40), torch.arange(10, 18)
    norm = EvalTransform(32, MEAN, STD)
    crops = ProbeCrops(norm, num_samples=20, copy=0, seed=0, crop_scale=(0.2, 1.0), flip_prob=0.5)
    out = crops(x, idx)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    # the same sample gets the same crop in any batch composition or order (sharding over ranks)
    assert torch.allclose(crops(x[[5, 2]], idx[[5, 2]]), out[[5, 2]], atol=1e-6)
    assert torch.allclose(ProbeCrops(norm, 20, 0, 0, (0.2, 1.0))(x, idx), out)
    # another copy (or seed) crops differently, and a crop differs from the center view
    assert not torch.allclose(ProbeCrops(norm, 20, 1, 0, (0.2, 1.0))(x, idx), out)
    assert not torch.allclose(out, norm(x))


def test_probe_crop_of_the_whole_image_without_flip_is_the_resized_image():
    x = batch(4, 32)
    norm = EvalTransform(32, MEAN, STD)
    crops = ProbeCrops(norm, 4, 0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0)
    assert torch.allclose(crops(x, torch.arange(4)), norm(x), atol=1e-5)
    flipped = ProbeCrops(norm, 4, 0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0)
    assert torch.allclose(flipped(x, torch.arange(4)), norm(x).flip(-1), atol=1e-5)
