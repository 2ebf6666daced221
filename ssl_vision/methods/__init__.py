"""Method registry: ``method.name`` -> SSLMethod subclass."""

from __future__ import annotations

from ..config import ConfigError
from .base import SSLMethod
from .mae import MAE
from .moco import MoCoV2, MoCoV3
from .simclr import SimCLR

METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "moco_v2": MoCoV2, "moco_v3": MoCoV3, "mae": MAE}


def method_class(name: str) -> type[SSLMethod]:
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg, num_classes: int) -> SSLMethod:
    return method_class(cfg.method.name)(cfg, num_classes)
