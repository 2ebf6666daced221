"""Recipe fidelity: every conf/experiment recipe does what the reference it cites does.

The expected values are written here from the reference files themselves (repository path and
version next to each block), independently of the configs, so a drifting config fails a test.
Also: the heads, stems and schedules those values select, and the gradient-accumulation guard.
"""

import math

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from ssl_vision.backbones import backbone_from_config, build_backbone
from ssl_vision.config import ConfigError, conf_dir
from ssl_vision.evaluation import linear_probe, linear_probe_options, probe_head, probe_lr_schedule
from ssl_vision.methods import build_method
from ssl_vision.methods.simclr import simclr_projector
from ssl_vision.optim import LARS, build_optimizer, gradient_accumulation_check

RECIPES = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))

# vturrisi/solo-learn HEAD 9187ea3: scripts/pretrain/cifar/*.yaml, scripts/pretrain/imagenet-100/*.yaml
# (+ their augmentations/*.yaml), solo/utils/lars.py, solo/methods/*.py, solo/methods/base.py (CIFAR stem:
# 3x3, stride 1, padding 2), torchvision resnet18 (zero_init_residual=False), scripts/linear/imagenet-100/*.yaml.
SOLO_LARS = {"optimizer.name": "lars", "optimizer.lars_trust": "solo_learn", "optimizer.clip_lr": True,
             "optimizer.eta": 0.02, "optimizer.momentum": 0.9, "optimizer.exclude_bias_norm": True,
             "optimizer.warmup_epochs": 10}
SOLO_RESNET = {"backbone.kwargs.zero_init_last": False, "augment.all_views.interpolation": "bicubic"}
SOLO_CIFAR = {**SOLO_RESNET, "backbone.small_stem_style": "solo_learn", "data.batch_size": 256,
              "trainer.max_epochs": 1000}
SOLO_IN100 = {**SOLO_RESNET, "data.batch_size": 256, "trainer.max_epochs": 400,  # 2 GPUs x 128
              "augment.all_views.blur_kernel": 23}  # solo/data/dali_dataloader.py GaussianBlur(window_size=23)
CIFAR_BLUR = {"augment.all_views.blur_prob": 0.5, "augment.all_views.blur_min_size": 0,  # PIL blur at 32 px
              "augment.all_views.blur_kernel": "auto"}
SOLO_LINEAR = {"eval.linear.optimizer": "sgd", "eval.linear.momentum": 0.9, "eval.linear.batch_size": 256,
               "eval.linear.scale_lr": True, "eval.linear.weight_decay": 0.0, "eval.linear.epochs": 100,
               "eval.linear.schedule": "step", "eval.linear.milestones": [60, 80], "eval.linear.gamma": 0.1,
               "eval.linear.interval": "epoch", "eval.linear.norm": "none", "eval.linear.init_std": None}
SYMMETRIC = {"augment.all_views.crop_scale": [0.08, 1.0], "augment.all_views.jitter_prob": 0.8,
             "augment.all_views.brightness": 0.8, "augment.all_views.contrast": 0.8,
             "augment.all_views.saturation": 0.8, "augment.all_views.hue": 0.2,
             "augment.all_views.grayscale_prob": 0.2, "augment.all_views.blur_prob": 0.5,
             "augment.all_views.solarize_prob": 0.0, "augment.all_views.flip_prob": 0.5}
SYMMETRIC_WEAK = {**SYMMETRIC, "augment.all_views.brightness": 0.4, "augment.all_views.contrast": 0.4,
                  "augment.all_views.saturation": 0.4, "augment.all_views.hue": 0.1}
ASYMMETRIC = {"augment.all_views.crop_scale": [0.08, 1.0], "augment.all_views.jitter_prob": 0.8,
              "augment.all_views.brightness": 0.4, "augment.all_views.contrast": 0.4,
              "augment.all_views.saturation": 0.2, "augment.all_views.hue": 0.1,
              "augment.all_views.grayscale_prob": 0.2, "augment.views.view1.solarize_prob": 0.0,
              "augment.views.view2.solarize_prob": 0.2}
SOLO_SIMCLR = {**SOLO_LARS, "method.temperature": 0.2, "method.projector": "solo_learn",
               "method.bn_stats": "per_view", "optimizer.weight_decay": 1e-4, "probe.lr": 0.1,
               "eval.linear.lr": 1.0, **SOLO_LINEAR}
SOLO_MOCO_V2 = {"method.temperature": 0.2, "method.proj_hidden_dim": 2048, "method.proj_output_dim": 256,
                "method.momentum": 0.99, "optimizer.name": "sgd", "optimizer.lr": 0.3, "optimizer.momentum": 0.9,
                "optimizer.weight_decay": 1e-4, "optimizer.exclude_bias_norm": False, "optimizer.warmup_epochs": 10,
                "probe.lr": 0.3, "eval.linear.lr": 3.0, **SOLO_LINEAR, **SYMMETRIC_WEAK}
SOLO_MOCO_V3 = {**SOLO_LARS, **ASYMMETRIC, "method.temperature": 0.2, "method.proj_hidden_dim": 4096,
                "method.proj_output_dim": 256, "method.pred_hidden_dim": 4096, "method.momentum": 0.99,
                "optimizer.lr": 0.3, "optimizer.weight_decay": 1e-6, "probe.lr": 0.3, "eval.linear.lr": 0.3,
                **SOLO_LINEAR}
# issue 17's methods, same solo-learn version: scripts/pretrain/{cifar,imagenet-100}/{byol,dino,dino_vit,simsiam,
# barlow,vicreg}.yaml; the defaults their scripts leave out from solo/methods/{dino,barlow_twins}.py,
# solo/losses/dino.py, solo/args/pretrain.py (SGD momentum 0.9, AdamW betas, no bias/norm exclusion from wd
# unless exclude_bias_n_norm); offline lr from scripts/linear/imagenet-100/{byol,dino,simsiam,barlow,vicreg}.yaml.
SOLO_BYOL = {**SOLO_LARS, **ASYMMETRIC, **SOLO_LINEAR, "method.proj_hidden_dim": 4096, "method.proj_output_dim": 256,
             "method.momentum": 0.99, "probe.lr": 0.1, "eval.linear.lr": 0.3}
SOLO_BARLOW = {**SOLO_LARS, **ASYMMETRIC, **SOLO_LINEAR, "method.proj_hidden_dim": 2048, "method.proj_output_dim": 2048,
               "method.proj_layers": 3, "method.lambd": 0.0051, "method.scale_loss": 0.1, "method.bias_lr": None,
               "optimizer.lr": 0.3, "optimizer.weight_decay": 1e-4, "probe.lr": 0.1, "eval.linear.lr": 0.1}
# solo-learn's variance term sums the two branches' (solo/losses/vicreg.py); ssl_vision.losses.vicreg_loss halves
# them as facebookresearch/vicreg does, so var_loss_weight 25 is std_coeff 50
SOLO_VICREG = {**SOLO_LARS, **SOLO_LINEAR, "method.proj_hidden_dim": 2048, "method.proj_output_dim": 2048,
               "method.proj_layers": 3, "method.sim_coeff": 25.0, "method.std_coeff": 2 * 25.0, "method.cov_coeff": 1.0,
               "optimizer.lr": 0.3, "optimizer.weight_decay": 1e-4, "probe.lr": 0.1, "eval.linear.lr": 0.3,
               "augment.all_views.crop_scale": [0.2, 1.0], "augment.all_views.jitter_prob": 0.8,
               "augment.all_views.brightness": 0.4, "augment.all_views.contrast": 0.4,
               "augment.all_views.saturation": 0.2, "augment.all_views.hue": 0.1,
               "augment.all_views.grayscale_prob": 0.2, "augment.all_views.flip_prob": 0.5,
               "augment.views.view1.solarize_prob": 0.1, "augment.views.view2.solarize_prob": 0.1}
SOLO_SIMSIAM = {**SOLO_LINEAR, "method.proj_hidden_dim": 2048, "method.proj_output_dim": 2048, "method.proj_layers": 3,
                "method.pred_hidden_dim": 512, "method.fix_pred_lr": True, "optimizer.name": "sgd",
                "optimizer.lr": 0.5, "optimizer.momentum": 0.9, "optimizer.weight_decay": 1e-5,
                "optimizer.exclude_bias_norm": False, "optimizer.warmup_epochs": 10, "probe.lr": 0.1,
                "eval.linear.lr": 30.0}
# DINO's views are global1 / global2 (its preset's names) and the 8 local crops are off: asymmetric.yaml has 2 crops
DINO_ASYMMETRIC = {**{k: v for k, v in ASYMMETRIC.items() if ".views." not in k},
                   "augment.views.global1.solarize_prob": 0.0, "augment.views.global2.solarize_prob": 0.2,
                   **{f"augment.views.local{i}": None for i in range(1, 9)}}
SOLO_DINO = {**DINO_ASYMMETRIC, **SOLO_LINEAR, "method.hidden_dim": 2048, "method.bottleneck_dim": 256,
             "method.head_layers": 3, "method.use_bn_in_head": False, "method.momentum": 0.9995,
             "method.student_temp": 0.1, "method.teacher_temp": 0.07, "method.warmup_teacher_temp": 0.04,
             "method.center_momentum": 0.9, "method.freeze_last_layer": 1, "method.clip_grad": 0.0,
             "method.weight_decay_end": None, "eval.linear.lr": 0.3}
SOLO_DINO_RESNET = {**SOLO_DINO, **SOLO_LARS, "method.out_dim": 4096, "method.norm_last_layer": True,
                    "optimizer.lr": 0.3, "optimizer.weight_decay": 1e-6, "probe.lr": 0.1}
# facebookresearch/mae main_linprobe.py + FINETUNE.md "Linear Probing" (+ util/lars.py, util/lr_sched.py)
MAE_LINPROBE = {"eval.linear.optimizer": "lars", "eval.linear.lars_trust": "moco_v3", "eval.linear.eta": 0.001,
                "eval.linear.momentum": 0.9, "eval.linear.lr": 0.1, "eval.linear.scale_lr": True,
                "eval.linear.batch_size": 16384, "eval.linear.weight_decay": 0.0, "eval.linear.epochs": 90,
                "eval.linear.warmup_epochs": 10, "eval.linear.schedule": "cosine", "eval.linear.interval": "step",
                "eval.linear.norm": "batchnorm", "eval.linear.init_std": 0.01, "eval.linear.drop_last": True}
# facebookresearch/moco-v3 main_lincls.py + CONFIG.md (ViT: --lr=3)
MOCO_V3_LINCLS = {"eval.linear.optimizer": "sgd", "eval.linear.momentum": 0.9, "eval.linear.scale_lr": True,
                  "eval.linear.batch_size": 1024, "eval.linear.weight_decay": 0.0, "eval.linear.epochs": 90,
                  "eval.linear.schedule": "cosine", "eval.linear.interval": "epoch", "eval.linear.warmup_epochs": 0,
                  "eval.linear.norm": "none", "eval.linear.init_std": 0.01}

REFERENCE = {
    # solo-learn scripts/pretrain/cifar/simclr.yaml + augmentations/symmetric.yaml
    "cifar10_simclr_resnet18": {**SOLO_SIMCLR, **SOLO_CIFAR, **SYMMETRIC, **CIFAR_BLUR, "method.proj_hidden_dim": 2048,
                                "method.proj_output_dim": 256, "optimizer.lr": 0.4},
    # solo-learn scripts/pretrain/imagenet-100/simclr.yaml + augmentations/symmetric.yaml
    "imagenet100_simclr_resnet18": {**SOLO_SIMCLR, **SOLO_IN100, **SYMMETRIC, "method.proj_hidden_dim": 4096,
                                    "method.proj_output_dim": 512, "optimizer.lr": 0.3},
    # solo-learn scripts/pretrain/cifar/mocov2plus.yaml + augmentations/symmetric_weak.yaml
    "cifar10_moco_v2_resnet18": {**SOLO_MOCO_V2, **SOLO_CIFAR, **CIFAR_BLUR, "method.queue_size": 32768},
    # solo-learn scripts/pretrain/imagenet-100/mocov2plus.yaml
    "imagenet100_moco_v2_resnet18": {**SOLO_MOCO_V2, **SOLO_IN100, "method.queue_size": 65536},
    # solo-learn scripts/pretrain/cifar/mocov3.yaml + augmentations/asymmetric.yaml (no blur at 32 px)
    "cifar10_moco_v3_resnet18": {**SOLO_MOCO_V3, **SOLO_CIFAR, "augment.views.view1.blur_prob": 0.0,
                                 "augment.views.view2.blur_prob": 0.0},
    # solo-learn scripts/pretrain/imagenet-100/mocov3.yaml + augmentations/asymmetric.yaml
    "imagenet100_moco_v3_resnet18": {**SOLO_MOCO_V3, **SOLO_IN100, "augment.views.view1.blur_prob": 1.0,
                                     "augment.views.view2.blur_prob": 0.1},
    # solo-learn scripts/pretrain/cifar/byol.yaml + augmentations/asymmetric.yaml (no blur at 32 px)
    "cifar10_byol_resnet18": {**SOLO_BYOL, **SOLO_CIFAR, "method.pred_hidden_dim": 4096, "optimizer.lr": 1.0,
                              "optimizer.weight_decay": 1e-5, "augment.views.view1.blur_prob": 0.0,
                              "augment.views.view2.blur_prob": 0.0},
    # solo-learn scripts/pretrain/imagenet-100/byol.yaml + augmentations/asymmetric.yaml
    "imagenet100_byol_resnet18": {**SOLO_BYOL, **SOLO_IN100, "method.pred_hidden_dim": 8192, "optimizer.lr": 0.5,
                                  "optimizer.weight_decay": 1e-6, "augment.views.view1.blur_prob": 1.0,
                                  "augment.views.view2.blur_prob": 0.1},
    # solo-learn scripts/pretrain/cifar/barlow.yaml + augmentations/asymmetric.yaml (no blur at 32 px)
    "cifar10_barlow_twins_resnet18": {**SOLO_BARLOW, **SOLO_CIFAR, "augment.views.view1.blur_prob": 0.0,
                                      "augment.views.view2.blur_prob": 0.0},
    # solo-learn scripts/pretrain/imagenet-100/barlow.yaml + augmentations/asymmetric.yaml
    "imagenet100_barlow_twins_resnet18": {**SOLO_BARLOW, **SOLO_IN100, "augment.views.view1.blur_prob": 1.0,
                                          "augment.views.view2.blur_prob": 0.1},
    # solo-learn scripts/pretrain/cifar/vicreg.yaml (its own augmentations list: no blur)
    "cifar10_vicreg_resnet18": {**SOLO_VICREG, **SOLO_CIFAR, "augment.views.view1.blur_prob": 0.0,
                                "augment.views.view2.blur_prob": 0.0},
    # solo-learn scripts/pretrain/imagenet-100/vicreg.yaml + augmentations/vicreg.yaml
    "imagenet100_vicreg_resnet18": {**SOLO_VICREG, **SOLO_IN100, "augment.views.view1.blur_prob": 0.5,
                                    "augment.views.view2.blur_prob": 0.5},
    # solo-learn scripts/pretrain/cifar/simsiam.yaml + augmentations/symmetric_weak.yaml (PIL blur at 32 px)
    "cifar10_simsiam_resnet18": {**SOLO_SIMSIAM, **SOLO_CIFAR, **SYMMETRIC_WEAK, **CIFAR_BLUR},
    # solo-learn scripts/pretrain/imagenet-100/simsiam.yaml + augmentations/asymmetric.yaml (its defaults list)
    "imagenet100_simsiam_resnet18": {**SOLO_SIMSIAM, **SOLO_IN100, **ASYMMETRIC, "augment.views.view1.blur_prob": 1.0,
                                     "augment.views.view2.blur_prob": 0.1},
    # solo-learn scripts/pretrain/cifar/dino.yaml + augmentations/asymmetric.yaml (no blur at 32 px), dino.py defaults
    "cifar10_dino_resnet18": {**SOLO_DINO_RESNET, **SOLO_CIFAR, "method.warmup_teacher_temp_epochs": 0,
                              "augment.views.global1.blur_prob": 0.0, "augment.views.global2.blur_prob": 0.0},
    # solo-learn scripts/pretrain/imagenet-100/dino.yaml + augmentations/asymmetric.yaml
    "imagenet100_dino_resnet18": {**SOLO_DINO_RESNET, **SOLO_IN100, "method.warmup_teacher_temp_epochs": 50,
                                  "augment.views.global1.blur_prob": 1.0, "augment.views.global2.blur_prob": 0.1},
    # solo-learn scripts/pretrain/imagenet-100/dino_vit.yaml + augmentations/asymmetric.yaml, solo/backbones/vit/vit.py
    # (vit_tiny: patch 16). README: a run without DALI (PIL blur, bicubic torchvision crop) at a total batch of 128
    # in float32: solo/args/pretrain.py scales lr and classifier_lr by 128 / 256. AdamW on every parameter.
    "imagenet100_dino_vit_tiny": {
        **SOLO_DINO, "method.out_dim": 65536, "method.norm_last_layer": False, "method.warmup_teacher_temp_epochs": 0,
        "optimizer.name": "adamw", "optimizer.lr": 5e-3, "optimizer.weight_decay": 1e-4,
        "optimizer.betas": [0.9, 0.999], "optimizer.exclude_bias_norm": False, "optimizer.warmup_epochs": 10,
        "optimizer.scale_lr": True, "data.batch_size": 128, "probe.lr": 3e-3 * 128 / 256, "backbone.patch_size": 16,
        "trainer.max_epochs": 400, "trainer.precision": "32-true", "augment.views.global1.blur_prob": 1.0,
        "augment.views.global2.blur_prob": 0.1, "augment.all_views.blur_kernel": "auto",
        "augment.all_views.interpolation": "bicubic"},
    # solo-learn scripts/pretrain/imagenet-100/mocov3_vit.yaml (8 GPUs x 128, AdamW defaults, all parameters
    # decayed, warm-up default 10), solo/backbones/vit/vit_mocov3.py (12 heads, moco-v3 init, sin-cos, no stop-grad)
    "imagenet100_moco_v3_vit_small": {
        **ASYMMETRIC, **SOLO_LINEAR, "method.temperature": 0.2, "method.proj_hidden_dim": 4096,
        "method.proj_output_dim": 256, "method.pred_hidden_dim": 4096, "method.momentum": 0.99,
        "method.vit_moco_init": True, "method.vit_sincos_pos_embed": True, "method.vit_frozen_patch_embed": False,
        "optimizer.name": "adamw", "optimizer.lr": 3e-4, "optimizer.weight_decay": 0.1,
        "optimizer.betas": [0.9, 0.999], "optimizer.exclude_bias_norm": False, "optimizer.warmup_epochs": 10,
        "data.batch_size": 1024, "probe.lr": 3e-4 * 1024 / 256, "backbone.kwargs.num_heads": 12,
        "backbone.patch_size": 16, "trainer.max_epochs": 400, "eval.linear.lr": 0.3,
        "augment.views.view1.blur_prob": 1.0, "augment.views.view2.blur_prob": 0.1,
        "augment.all_views.blur_kernel": 23, "augment.all_views.interpolation": "bicubic"},
    # facebookresearch/moco-v3 CONFIG.md ViT-Small (AdamW 1.5e-4, wd .1 on model.parameters(), 300 epochs,
    # 40 warm-up, --stop-grad-conv1 --moco-m-cos --moco-t=.2), vits.py (12 heads), main_lincls.py --lr=3
    "cifar10_moco_v3_vit_small": {
        **MOCO_V3_LINCLS, "method.temperature": 0.2, "method.proj_hidden_dim": 4096,
        "method.proj_output_dim": 256, "method.pred_hidden_dim": 4096, "method.momentum": 0.99,
        "method.vit_moco_init": True, "method.vit_sincos_pos_embed": True, "method.vit_frozen_patch_embed": True,
        "optimizer.name": "adamw", "optimizer.lr": 1.5e-4, "optimizer.weight_decay": 0.1,
        "optimizer.betas": [0.9, 0.999], "optimizer.exclude_bias_norm": False, "optimizer.warmup_epochs": 40,
        "backbone.kwargs.num_heads": 12, "trainer.max_epochs": 300, "eval.linear.lr": 3.0,
        "augment.all_views.crop_scale": [0.08, 1.0], "augment.all_views.interpolation": "bilinear"},
    # solo-learn scripts/pretrain/cifar/mae.yaml + augmentations/reconstruction.yaml, vit_mae.py (12 heads)
    "cifar10_mae_vit_small": {
        **MAE_LINPROBE, "method.mask_ratio": 0.75, "method.decoder_dim": 512, "method.decoder_depth": 8,
        "method.decoder_heads": 16, "method.norm_pix_loss": True, "optimizer.name": "adamw", "optimizer.lr": 2e-4,
        "optimizer.weight_decay": 0.05, "optimizer.betas": [0.9, 0.95], "optimizer.exclude_bias_norm": False,
        "optimizer.warmup_epochs": 10, "data.batch_size": 256, "probe.lr": 2e-4, "backbone.kwargs.num_heads": 12,
        "backbone.patch_size": 4, "trainer.max_epochs": 1000, "augment.all_views.crop_scale": [0.08, 1.0],
        "augment.all_views.flip_prob": 0.5, "augment.all_views.jitter_prob": 0.0,
        "augment.all_views.interpolation": "bicubic"},
    # facebookresearch/mae PRETRAIN.md / main_pretrain.py (batch 64 x 64 GPUs = 4096, blr 1.5e-4, wd 0.05,
    # betas (0.9, 0.95), timm add_weight_decay, 40 warm-up epochs, crop 0.2-1)
    "imagenet100_mae_vit_base": {
        **MAE_LINPROBE, "method.mask_ratio": 0.75, "method.decoder_dim": 512, "method.decoder_depth": 8,
        "method.decoder_heads": 16, "method.norm_pix_loss": True, "optimizer.name": "adamw",
        "optimizer.lr": 1.5e-4, "optimizer.weight_decay": 0.05, "optimizer.betas": [0.9, 0.95],
        "optimizer.exclude_bias_norm": True, "optimizer.warmup_epochs": 40, "augment.all_views.crop_scale": [0.2, 1.0],
        "augment.all_views.interpolation": "bicubic",
        "recipe.accumulate_grad_batches": 16, "trainer.accumulate_grad_batches": 16},
}


def compose(make_cfg, name, *extra):
    return make_cfg(f"experiment={name}", *extra)


def test_every_method_and_dataset_has_its_recipes_and_each_recipe_its_reference_values():
    assert sorted(REFERENCE) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_matches_the_values_of_its_reference(make_cfg, name):
    cfg = compose(make_cfg, name)
    for key, expected in REFERENCE[name].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if isinstance(expected, float):
            assert value is not None and math.isclose(value, expected, rel_tol=1e-9), (key, value, expected)
        else:
            assert value == expected, (key, value, expected)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_a_global_package_that_names_its_reference_and_number(name):
    path = conf_dir() / "experiment" / f"{name}.yaml"
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_"
    recipe = yaml.safe_load(path.read_text())
    overrides = {k: v for d in recipe["defaults"] for k, v in d.items()}
    dataset, method = name.split("_")[0], overrides["override /method"]
    assert set(overrides) == {"override /method", "override /backbone", "override /data", "override /eval"}
    assert overrides["override /data"] == dataset and method in name and overrides["override /backbone"] in name
    for group in ("method", "backbone", "eval"):
        assert (conf_dir() / group / f"{overrides[f'override /{group}']}.yaml").is_file()
    r = recipe["recipe"]
    assert r["name"] == name and r["compare_with"] in ("online_probe_top1", "linear_probe_top1")
    assert r["reference"].split()[0] in ("vturrisi/solo-learn", "facebookresearch/moco-v3", "facebookresearch/mae")
    comment = " ".join(line for line in lines if line.startswith("#"))
    assert r["reference"].split()[1] in comment  # the comment names the file it follows
    if r["reference_top1"] is not None:
        assert str(r["reference_top1"]) in comment
    assert recipe["trainer"]["max_epochs"] >= 300


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_builds_its_model(make_cfg, name):
    """Composed on the small synthetic data (its own data config is checked when it exists)."""
    cfg = compose(make_cfg, name, "data=synthetic")
    model = build_method(cfg, 4)
    build_optimizer(cfg.optimizer, model.param_groups())
    assert compose(make_cfg, name).data.name == name.split("_")[0]


@pytest.mark.parametrize("name,blurred,kernel", [("cifar10_simclr_resnet18", True, 13),
                                                  ("cifar10_moco_v2_resnet18", True, 13),
                                                  ("cifar10_moco_v3_resnet18", False, None),
                                                  ("cifar10_simsiam_resnet18", True, 13),
                                                  *[(f"cifar10_{m}_resnet18", False, None)
                                                    for m in ("byol", "barlow_twins", "vicreg", "dino")]])
def test_cifar_recipes_blur_at_32_px_as_solo_learns_pil_blur(make_cfg, name, blurred, kernel):
    """solo-learn (since its yaml scripts) applies PIL's GaussianBlur(radius=sigma), sigma in [0.1, 2], at
    p=0.5 to 32 px SimCLR / MoCo v2+ / SimSiam (symmetric_weak.yaml) views; its kernel is not capped by the image
    size, so the view gets the whole +-3 sigma Gaussian (13 px), not a 10%-of-32-px (3 px) one. The CIFAR views
    of MoCo v3, BYOL, Barlow Twins, DINO (asymmetric.yaml) and VICReg (vicreg.yaml's own list): no blur."""
    from ssl_vision.augment import blur_kernel_size

    cfg = compose(make_cfg, name)
    model = build_method(OmegaConf.merge(cfg, {"method": {"queue_size": 256}}) if "moco_v2" in name else cfg, 10)
    for view in model.augment.views:
        assert view["size"] == 32 and view["interpolation"] == "bicubic"
        applies = view["blur_prob"] > 0 and view["size"] >= view["blur_min_size"]
        assert applies == blurred
        if blurred:
            assert view["blur_prob"] == 0.5 and blur_kernel_size(view) == kernel and list(view["blur_sigma"]) == [0.1, 2.0]


# --- ViT-Small heads: a per-recipe setting, not a changed preset ------------------------------------------


@pytest.mark.parametrize("name", [n for n in RECIPES if "vit_small" in n])
def test_vit_small_has_12_heads_in_moco_v3_and_mae_recipes(make_cfg, name):
    cfg = compose(make_cfg, name, "data=synthetic", "data.image_size=32", "backbone.patch_size=4")
    vit, _ = backbone_from_config(cfg.backbone, 32)
    assert vit.embed_dim == 384 and len(vit.blocks) == 12
    assert all(block.attn.num_heads == 12 for block in vit.blocks)


def test_vit_small_preset_keeps_timms_6_heads_as_dino():
    vit, _ = build_backbone("vit_small", 32, patch_size=4)
    assert vit.blocks[0].attn.num_heads == 6


# --- SimCLR projector and forward ---------------------------------------------------------------------------


def kinds(seq):
    return [type(m).__name__ for m in seq]


def test_simclr_heads_are_the_cited_references_layer_sequences():
    # solo-learn solo/methods/simclr.py: Linear(feat, hidden) - ReLU - Linear(hidden, out), biases on
    solo = simclr_projector("solo_learn", 512, 2048, 256)
    assert kinds(solo) == ["Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in solo if isinstance(m, nn.Linear)] == \
        [(512, 2048, True), (2048, 256, True)]
    # google-research/simclr model_util.py projection_head + linear_layer: dense without bias, BN (centre on
    # the middle layers, off on the last), ReLU between; kernels N(0, 0.01)
    torch.manual_seed(0)
    ref = simclr_projector("simclr", 512, 2048, 128, layers=3)
    assert kinds(ref) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in ref if isinstance(m, nn.Linear))
    assert all(abs(float(m.weight.detach().std()) - 0.01) < 0.001 for m in ref if isinstance(m, nn.Linear))
    middle, last = ref[1], ref[-1]
    assert middle.affine and middle.bias.requires_grad
    assert last.weight.requires_grad and not last.bias.requires_grad and torch.equal(last.bias, torch.zeros(128))
    with pytest.raises(ConfigError, match="method.projector"):
        simclr_projector("lightly", 512, 2048, 128)


@pytest.mark.parametrize("bn_stats,calls", [("per_view", [8, 8]), ("joint", [16])])
def test_simclr_batchnorm_statistics_per_view_or_joint(make_cfg, bn_stats, calls):
    model = build_method(make_cfg("method=simclr", "data=synthetic", "backbone=resnet18_tiny",
                                  "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                                  f"method.bn_stats={bn_stats}"), 4)
    seen = []
    model.backbone.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    out = model.forward_views(views)
    assert seen == calls and out["feats"].shape[0] == 8
    model.eval()  # the first view's features are those of the first view alone
    with torch.no_grad():
        assert torch.allclose(model.forward_views(views)["feats"], model.backbone(views[0]), atol=1e-5)


def test_simclr_recipes_train_with_solo_learns_clipped_lars_and_the_default_too(make_cfg):
    for cfg in (make_cfg("method=simclr", "data=synthetic"), compose(make_cfg, "cifar10_simclr_resnet18",
                                                                   "data=synthetic")):
        groups = build_method(cfg, 4).param_groups()
        opt = build_optimizer(cfg.optimizer, groups)
        assert isinstance(opt, LARS)
        lars = [g for g in opt.param_groups if not g["lars_exclude"]]
        assert lars and all(g["trust"] == "solo_learn" and g["clip_lr"] for g in lars)
        assert all(p.ndim > 1 for g in lars for p in g["params"])  # biases and norms are excluded


# --- ResNet stem and init of the solo-learn recipes ---------------------------------------------------------


def test_solo_learn_cifar_stem_pads_by_2_and_torchvision_init_keeps_last_bn_at_one():
    seen = {}
    for style in ("default", "solo_learn"):
        net, _ = build_backbone("resnet18", 32, small_stem_style=style, kwargs={"zero_init_last": False})
        assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
        seen[style] = net.conv1(torch.zeros(1, 3, 32, 32)).shape[-1]
        assert all(torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight)) for b in net.layer1)
    assert seen == {"default": 32, "solo_learn": 34}  # solo/methods/base.py: Conv2d(3, 64, 3, 1, padding=2)
    timm_default, _ = build_backbone("resnet18", 32)  # zero_init_last, as moco-v3's zero_init_residual=True
    assert all(torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight)) for b in timm_default.layer1)
    with pytest.raises(ConfigError, match="small_stem_style"):
        build_backbone("resnet18", 32, small_stem_style="cifar")


# --- linear-probe protocols -----------------------------------------------------------------------------------


def test_probe_schedules_match_the_references_formulas():
    # MAE util/lr_sched.py adjust_learning_rate, called every step with epoch + step / steps_per_epoch
    lrs = probe_lr_schedule(6.4, 90, 7, "cosine", "step", warmup_epochs=10)
    for k in (0, 3, 69, 70, 71, 300, 629):
        t = k // 7 + (k % 7) / 7
        ref = 6.4 * t / 10 if t < 10 else 6.4 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 80))
        assert math.isclose(lrs[k], ref, rel_tol=1e-12, abs_tol=1e-15), k
    assert lrs[0] == 0.0 and len(lrs) == 630
    # moco-v3 main_lincls.py adjust_learning_rate: once per epoch, init_lr * 0.5 * (1 + cos(pi * epoch / epochs))
    lrs = probe_lr_schedule(0.4, 90, 5, "cosine", "epoch")
    for k in range(0, 450, 7):
        assert math.isclose(lrs[k], 0.4 * 0.5 * (1 + math.cos(math.pi * (k // 5) / 90)), rel_tol=1e-12)
    # solo-learn: torch's MultiStepLR([60, 80], gamma 0.1), stepped per epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [60, 80], gamma=0.1)
    ref = []
    for _ in range(100):
        ref += [opt.param_groups[0]["lr"]] * 3
        opt.step()
        sched.step()
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(probe_lr_schedule(0.3, 100, 3, "step", "epoch"), ref))
    # the fast default: torch's CosineAnnealingLR over every step
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20 * 6)
    ref = []
    for _ in range(120):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(probe_lr_schedule(0.1, 20, 6), ref))


def test_mae_probe_head_and_optimizer(make_cfg):
    cfg = make_cfg("eval=mae_linprobe")
    opts = linear_probe_options(cfg.eval.linear)
    head = probe_head(384, 10, opts["norm"], opts["init_std"], torch.Generator().manual_seed(0))
    bn, linear = head
    # main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6) before the Linear, trunc_normal_(std=0.01), zero bias
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert abs(float(linear.weight.detach().std()) - 0.01) < 0.001 and torch.equal(linear.bias.detach(), torch.zeros(10))
    # blr 0.1 x 16384 / 256
    assert opts["lr"] * opts["batch_size"] / 256 == pytest.approx(6.4)
    solo = linear_probe_options(make_cfg("eval=solo_linear").eval.linear)
    plain = probe_head(512, 100, solo["norm"], solo["init_std"], torch.Generator().manual_seed(0))
    assert kinds(plain) == ["Linear"] and plain[0].weight.abs().max() <= 1 / math.sqrt(512)  # nn.Linear's init
    assert plain[0].bias.abs().max() > 0


@pytest.mark.parametrize("preset", ["default", "mae_linprobe", "moco_v3_lincls", "solo_linear"])
def test_each_probe_protocol_learns_separable_features(make_cfg, preset):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(600) % 4
    x = centers[y] + torch.randn(600, 16, generator=g)
    opts = linear_probe_options(make_cfg(f"eval={preset}").eval.linear)
    opts.update(epochs=12, batch_size=min(opts["batch_size"], 64))
    if opts["schedule"] == "step":
        opts["milestones"] = (6, 9)
    if opts["warmup_epochs"]:
        opts["warmup_epochs"] = 2
    res = linear_probe(x[:500], y[:500], x[500:], y[500:], 4, **opts)
    assert res["top1"] > 0.9


def test_mae_probe_uses_lars_with_the_bias_excluded(monkeypatch, make_cfg):
    import ssl_vision.optim as optim

    made = []
    real = optim.LARS

    def spy(groups, **kw):
        made.append((groups, kw))
        return real(groups, **kw)

    monkeypatch.setattr(optim, "LARS", spy)
    opts = linear_probe_options(make_cfg("eval=mae_linprobe").eval.linear)
    opts.update(epochs=2, batch_size=32)
    x, y = torch.randn(64, 8), torch.arange(64) % 2
    linear_probe(x, y, x, y, 2, **opts)
    (groups, kw), = made
    assert [p.shape for p in groups[0]["params"]] == [(2, 8)] and not groups[0].get("lars_exclude")
    assert [p.shape for p in groups[1]["params"]] == [(2,)] and groups[1]["lars_exclude"]
    assert kw["eta"] == 0.001 and kw["trust"] == "moco_v3" and kw["momentum"] == 0.9


# --- gradient accumulation ----------------------------------------------------------------------------------


def test_gradient_accumulation_is_refused_for_batch_coupled_recipes_and_warned_about_elsewhere(make_cfg, caplog):
    recipe = compose(make_cfg, "cifar10_simclr_resnet18")
    assert gradient_accumulation_check(recipe, 1) == []
    with pytest.raises(ConfigError) as e:
        gradient_accumulation_check(recipe, 4)
    msg = str(e.value)
    assert "\n" not in msg and "trainer.accumulate_grad_batches=4" in msg and "micro-batches of 256" in msg
    assert "negatives" in msg and "recipe.strict=false" in msg
    recipe.recipe.strict = False
    assert len(gradient_accumulation_check(recipe, 4)) == 1
    # no recipe: a warning per method that couples samples; MAE on a ViT is exact
    for method, words in (("simclr", ("negatives", "backbone")), ("moco_v3", ("negatives", "predictor")),
                          ("moco_v2", ("BatchNorm statistics of the backbone",))):
        caplog.clear()
        (warning,) = gradient_accumulation_check(make_cfg(f"method={method}"), 2)  # digits: ResNet-18/4
        assert all(w in warning for w in words) and warning in caplog.text
    # issue 17's methods: each names what couples its batch
    for method, words in (("byol", ("predictor", "target's projector")), ("simsiam", ("projector", "predictor")),
                          ("barlow_twins", ("cross-correlation", "global batch")),
                          ("vicreg", ("variance and covariance", "global batch")), ("dino", ("centre",))):
        (warning,) = gradient_accumulation_check(make_cfg(f"method={method}"), 2)
        assert all(w in warning for w in words) and "BatchNorm statistics of the backbone" in warning
        assert "is not in ssl_vision.optim.BATCH_COUPLING" not in warning
    (warning,) = gradient_accumulation_check(make_cfg("method=dino", "backbone=vit_tiny"), 2)
    assert "centre" in warning and "backbone" not in warning
    assert "backbone" not in gradient_accumulation_check(make_cfg("method=simclr", "backbone=vit_tiny"), 2)[0]
    assert gradient_accumulation_check(make_cfg("method=moco_v2", "backbone=vit_tiny"), 2) == []
    assert gradient_accumulation_check(make_cfg("method=mae", "backbone=vit_tiny"), 8) == []
    # the MAE ImageNet-100 recipe accumulates 16 steps, as MAE's --accum_iter does: accepted
    assert gradient_accumulation_check(compose(make_cfg, "imagenet100_mae_vit_base"), 16) == []


def test_probe_cli_uses_a_protocol_named_on_the_command_line(make_cfg):
    from ssl_vision.probe import probe_eval_config

    train_cfg = make_cfg()  # the run's own protocol: default
    named = make_cfg("eval=mae_linprobe", config_name="probe")
    ecfg = probe_eval_config(train_cfg, named, ["checkpoint=x", "eval=mae_linprobe"])
    assert ecfg.linear.optimizer == "lars" and ecfg.linear.norm == "batchnorm"
    ecfg = probe_eval_config(train_cfg, make_cfg(config_name="probe"), ["checkpoint=x"])
    assert ecfg.linear.optimizer == "sgd" and list(ecfg.linear.crop_scale) == [0.4, 1.0]  # the run's (digits)
