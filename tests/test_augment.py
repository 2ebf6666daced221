import pytest
import torch
from omegaconf import OmegaConf

from ssl_vision.augment import EvalTransform, MultiViewAugment, build_augment
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
