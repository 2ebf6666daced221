"""Export a pre-trained backbone as a plain timm state dict (safetensors) plus a JSON sidecar.

    python tools/export_backbone.py outputs/run/checkpoints/last.ckpt --out simclr_r18.safetensors

writes ``simclr_r18.safetensors`` - the backbone's ``state_dict`` with timm's own key names and no
classifier - and ``simclr_r18.json``, which says how to rebuild the model around it::

    {"format": "ssl-vision-backbone", "version": 1,
     "model_name": "resnet18",                        # the timm model name
     "create_model_kwargs": {"num_classes": 0, "channels": [16, 32, 64, 128]},
     "small_stem": true,                              # ResNet: 3x3 stride-1 conv1, maxpool = Identity
     "img_size": null, "patch_size": null,            # ViT: also inside create_model_kwargs
     "feature_dim": 128, "image_size": 32,            # features of images of this size ...
     "mean": [...], "std": [...],                     # ... normalized with these statistics
     "method": "simclr", "backbone": "resnet18_tiny", "checkpoint": "...", "global_step": 1234}

How to load it:

1. With ssl-vision installed: ``ssl_vision.export.load_exported("simclr_r18.safetensors")`` (the
   sidecar next to it is found by name) returns the model in eval mode.

2. With plain timm, when ``small_stem`` is false (every ViT; ResNets trained above 64 px)::

       import json, timm
       meta = json.load(open("simclr_r18.json"))
       model = timm.create_model(meta["model_name"], pretrained=True,
                                 pretrained_cfg_overlay=dict(file="simclr_r18.safetensors"),
                                 **meta["create_model_kwargs"])

   ``create_model_kwargs`` holds ``num_classes=0`` (the model returns pooled features), a preset's
   architecture arguments (e.g. ``channels`` for ``resnet18_tiny``) and, for a ViT, ``img_size``
   and ``patch_size``. For a ViT at 32 px with 4 px patches that is
   ``timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=...),
   num_classes=0, img_size=32, patch_size=4)``.

3. With plain timm, when ``small_stem`` is true (ResNets trained at <= 64 px, e.g. CIFAR): timm's
   7x7 stem must be replaced before the weights go in, so build the model without weights::

       import json, timm, torch.nn as nn
       from safetensors.torch import load_file
       meta = json.load(open("simclr_r18.json"))
       model = timm.create_model(meta["model_name"], pretrained=False, **meta["create_model_kwargs"])
       model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
       model.maxpool = nn.Identity()
       model.load_state_dict(load_file("simclr_r18.safetensors"))

   (``load_state_dict`` works for case 2 as well, after ``create_model(..., pretrained=False)``.)

The model's output for an ``image_size`` image normalized with ``mean`` / ``std`` (in eval mode) is
the feature vector ssl-vision's linear probe and kNN used. ``export_backbone`` checks that: it
rebuilds the model from the files it wrote and compares features (max abs difference < 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch import nn

from .config import ConfigError

FORMAT, VERSION = "ssl-vision-backbone", 1
TOLERANCE = 1e-5


def sidecar_path(weights) -> Path:
    return Path(weights).with_suffix(".json")


def _plain(value):
    """JSON-friendly copy of config values (tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _square(size):
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return int(size[0]) if size[0] == size[1] else [int(s) for s in size]


def has_small_stem(model: nn.Module) -> bool:
    """ssl-vision's small-image ResNet stem: 3x3 stride-1 ``conv1`` and no max-pool."""
    conv = getattr(model, "conv1", None)
    return (isinstance(conv, nn.Conv2d) and isinstance(getattr(model, "maxpool", None), nn.Identity)
            and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1))


def describe(backbone: nn.Module, train_cfg) -> dict:
    """The sidecar for ``backbone`` built by ssl-vision from the training config ``train_cfg``."""
    from .backbones import PRESET_KWARGS, is_vit, timm_name

    bcfg, dcfg = train_cfg["backbone"], train_cfg["data"]
    name = str(bcfg["name"])
    kwargs = {"num_classes": 0, **PRESET_KWARGS.get(name, {}), **dict(bcfg.get("kwargs") or {})}
    img_size = patch_size = None
    if is_vit(backbone):
        img_size, patch_size = _square(backbone.patch_embed.img_size), _square(backbone.patch_embed.patch_size)
        kwargs.update(img_size=img_size, patch_size=patch_size)
    return {
        "format": FORMAT, "version": VERSION,
        "model_name": timm_name(name),
        "create_model_kwargs": _plain(kwargs),
        "small_stem": has_small_stem(backbone),
        "img_size": img_size, "patch_size": patch_size,
        "feature_dim": int(getattr(backbone, "num_features", 0) or 0),
        "image_size": int(dcfg["image_size"]),
        "mean": [float(v) for v in dcfg["mean"]], "std": [float(v) for v in dcfg["std"]],
        "method": str(train_cfg["method"]["name"]), "backbone": name,
    }


def build_from_sidecar(meta: dict) -> nn.Module:
    """The empty model a sidecar describes: plain ``timm.create_model`` plus the small-stem swap."""
    if meta.get("format") != FORMAT:
        raise ConfigError(f"export: not an ssl-vision backbone sidecar (format {meta.get('format')!r})")
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["create_model_kwargs"])
    if meta.get("small_stem"):
        model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, stride=1, padding=1,
                                bias=False)
        model.maxpool = nn.Identity()
    return model


def load_exported(path) -> nn.Module:
    """Rebuild an exported backbone (``.safetensors`` or its ``.json`` sidecar) with plain timm; eval mode."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    weights = path.with_suffix(".safetensors") if path.suffix == ".json" else path
    meta_path = sidecar_path(weights)
    for p, what in ((weights, "weights"), (meta_path, "sidecar")):
        if not p.is_file():
            raise ConfigError(f"export: {what} file '{p}' does not exist; expected the pair written by "
                              "tools/export_backbone.py (<name>.safetensors + <name>.json)")
    model = build_from_sidecar(json.loads(meta_path.read_text()))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@torch.no_grad()
def max_feature_difference(a: nn.Module, b: nn.Module, image_size: int, n: int = 2, seed: int = 0) -> float:
    """Largest absolute difference between the eval-mode features of ``a`` and ``b`` on random images."""
    x = torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    was = a.training, b.training
    a.eval(), b.eval()
    try:
        return float((a(x) - b(x)).abs().max())
    finally:
        a.train(was[0]), b.train(was[1])


def export_backbone(checkpoint, out=None, verify: bool = True) -> tuple[Path, Path]:
    """Write the pre-trained backbone of an ssl-vision checkpoint as ``out`` (safetensors, timm key
    names) and its JSON sidecar; returns both paths. ``out`` defaults to
    ``<checkpoint>_backbone.safetensors``. With ``verify``, the files are reloaded with plain timm
    and must give the same features (max abs difference < 1e-5)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from .evaluation import backbone_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    backbone, _ = backbone_from_checkpoint(ckpt)
    backbone.eval()
    train_cfg = OmegaConf.to_container(OmegaConf.create(ckpt["hyper_parameters"]["cfg"]), resolve=True)
    ckpt_path = Path(str(checkpoint)).expanduser()
    weights = Path(out).expanduser() if out else ckpt_path.with_name(ckpt_path.stem + "_backbone.safetensors")
    if weights.suffix != ".safetensors":
        raise ConfigError(f"export: output '{weights}' should end in .safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    meta = describe(backbone, train_cfg)
    meta.update(checkpoint=str(ckpt_path), global_step=int(ckpt.get("global_step", 0)))
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    sidecar = sidecar_path(weights)
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    if verify:
        diff = max_feature_difference(backbone, load_exported(weights), meta["image_size"])
        if not diff < TOLERANCE:
            raise RuntimeError(f"export: '{weights}' rebuilt with plain timm gives features {diff:.3g} away from "
                               "the checkpoint's backbone; please report this")
    return weights, sidecar
