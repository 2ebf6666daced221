"""The fine-tuned network and how it is optimized: the timm classifier around the pre-trained backbone, its
head initialisation, layer-wise lr decay and the learning-rate schedule.

The classifier is the backbone's own timm model with a classification head (``num_classes`` in
``backbone.kwargs``; ``backbones.build_backbone``), so its state dict has timm's key names and the
checkpoint exports to timm like a pre-trained backbone (``ssl_vision.export``). For a ViT,
``finetune.pool=avg`` is MAE's ``--global_pool`` (facebookresearch/mae models_vit.py): the mean of the patch
tokens (not the [CLS] token) through a new LayerNorm ``fc_norm``, the pre-trained final ``norm`` dropped -
timm's ``global_pool='avg'`` builds exactly that (``fc_norm`` with the model's LayerNorm, ``norm`` an
Identity); ``pool=token`` keeps the [CLS] token and the pre-trained ``norm``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ConfigError

POOLS = ("avg", "token")
HEAD_INITS = ("trunc_normal", "zeros", "default")


def classifier_kwargs(bcfg, ft, num_classes: int, vit: bool) -> dict:
    """``backbone.kwargs`` of the fine-tuned model: the pre-trained ones plus the head (``num_classes``),
    drop path (``finetune.drop_path``, timm's stochastic depth rising linearly over the blocks, as MAE's
    ``drop_path_rate``) and, for a ViT, the pooling (``finetune.pool``)."""
    kwargs = dict(bcfg.get("kwargs") or {})
    kwargs["num_classes"] = int(num_classes)
    if float(ft.get("drop_path", 0.0)) > 0:
        kwargs["drop_path_rate"] = float(ft.drop_path)
    pool = str(ft.get("pool", "avg"))
    if pool not in POOLS:
        raise ConfigError(f"finetune.pool: unknown pooling '{pool}'; choose one of: {', '.join(POOLS)}")
    if vit:
        kwargs["global_pool"] = pool
    return kwargs


def load_pretrained(model: nn.Module, state_dict: dict) -> dict:
    """Load a pre-training checkpoint's ``backbone.*`` weights into the classifier ``model``; returns the
    missing and unexpected keys. As MAE's main_finetune.py asserts: only the head (and, with average
    pooling, ``fc_norm``) may be missing, only the dropped final ``norm`` unexpected."""
    state = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if not state:
        raise ConfigError("checkpoint: it holds no backbone.* weights; pass an ssl-vision-train checkpoint")
    head = {f"{name}.{p}" for name in _head_names(model) for p in ("weight", "bias")}
    pooled = isinstance(getattr(model, "norm", None), nn.Identity) and getattr(model, "fc_norm", None) is not None
    allowed_missing = head | ({"fc_norm.weight", "fc_norm.bias"} if pooled else set())
    allowed_unexpected = {"norm.weight", "norm.bias"} if pooled else set()
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    if not missing <= allowed_missing or not unexpected <= allowed_unexpected:
        raise RuntimeError(f"finetune: the pre-trained backbone does not fit the classifier: missing "
                           f"{sorted(missing - allowed_missing)}, unexpected {sorted(unexpected - allowed_unexpected)}")
    return {"missing": sorted(missing), "unexpected": sorted(unexpected)}


def _head_names(model: nn.Module) -> list[str]:
    """The classifier's module name(s) in a timm model (``head`` for ViTs, ``fc`` for ResNets)."""
    head = model.get_classifier()
    return [name for name, m in model.named_modules() if m is head]


def init_head(model: nn.Module, how: str = "trunc_normal", std: float = 2e-5) -> None:
    """The head's initialisation: ``trunc_normal``: weights ``timm.layers.trunc_normal_(std=std)`` (MAE:
    2e-5), zero bias; ``zeros``: weights and bias 0 (google-research/simclr ``--zero_init_logits_layer``);
    ``default``: timm's own. Uses torch's global generator (seeded per fine-tuning seed)."""
    from timm.layers import trunc_normal_

    if how not in HEAD_INITS:
        raise ConfigError(f"finetune.head_init: unknown '{how}'; choose one of: {', '.join(HEAD_INITS)}")
    head = model.get_classifier()
    if how == "default":
        return
    with torch.no_grad():
        if how == "zeros":
            head.weight.zero_()
        else:
            trunc_normal_(head.weight, std=float(std))
        if head.bias is not None:
            head.bias.zero_()


def vit_layer_id(name: str, num_layers: int) -> int:
    """facebookresearch/mae util/lr_decay.py ``get_layer_id_for_vit``: cls_token, pos_embed and the patch
    embedding are layer 0, block i is layer i + 1, everything else (final norm, fc_norm, head) ``num_layers``."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       no_weight_decay=("pos_embed", "cls_token")) -> list[dict]:
    """MAE's ``param_groups_lrd`` (util/lr_decay.py, after BEiT): with ``num_layers = depth + 1``, a parameter
    of layer ``l`` (``vit_layer_id``) gets ``lr_scale = layer_decay ** (num_layers - l)`` - block i:
    ``decay ** (depth - i)``, the patch embedding, cls token and position embedding ``decay ** (depth + 1)``,
    the head 1 - and weight decay unless it is 1-D or in ``no_weight_decay`` (timm's ``no_weight_decay()``).

    timm's ``param_groups_layer_decay`` gives the same scales for a globally pooled ViT but not with [CLS]
    pooling (it puts the final ``norm`` one layer below the head), so MAE's own rule is used."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name in no_weight_decay)
        layer = vit_layer_id(name, num_layers)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(key, {"name": key, "params": [], "lr_scale": scales[layer],
                                        "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def decay_groups(model: nn.Module, weight_decay: float, exclude_bias_norm: bool = True) -> list[dict]:
    """Without layer decay: weight decay on all but biases and norm weights (1-D), lr scale 1."""
    from ..optim import split_decay

    decay, no_decay = split_decay(model, exclude_bias_norm)
    groups = [{"name": "decay", "params": decay, "lr_scale": 1.0, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "lr_scale": 1.0, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def schedule_lr(epoch: float, lr: float, epochs: float, warmup_epochs: float = 0.0, min_lr: float = 0.0) -> float:
    """The learning rate at the fractional epoch ``epoch`` (facebookresearch/mae util/lr_sched.py, set before every
    step): linear warm-up from 0, then a half-cycle cosine from ``lr`` to ``min_lr``. Every group then takes
    ``lr_scale`` times it. Without warm-up and with ``min_lr = 0`` it is google-research/simclr's
    ``tf.train.cosine_decay`` over the run's steps."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(ocfg, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """``finetune.optimizer``: ``adamw`` (torch's, ``betas``: MAE's main_finetune.py uses the defaults) or
    ``sgd`` (``momentum``, ``nesterov``: google-research/simclr's ``--optimizer=momentum`` is Nesterov). Each
    group starts at ``lr x lr_scale``."""
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    name = str(ocfg.name)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(ocfg.get("betas", (0.9, 0.999))))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(ocfg.get("momentum", 0.9)),
                               nesterov=bool(ocfg.get("nesterov", False)))
    raise ConfigError(f"finetune.optimizer.name: unknown optimizer '{name}'; choose one of: adamw, sgd")
