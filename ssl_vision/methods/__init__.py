"""Method registry: ``method.name`` -> SSLMethod subclass."""

from __future__ import annotations

from ..config import ConfigError
from .barlow_twins import BarlowTwins
from .base import SSLMethod
from .byol import BYOL
from .dino import DINO
from .mae import MAE
from .moco import MoCoV2, MoCoV3
from .simclr import SimCLR
from .simsiam import SimSiam
from .vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR, "moco_v2": MoCoV2, "moco_v3": MoCoV3, "mae": MAE,
    "byol": BYOL, "dino": DINO, "simsiam": SimSiam, "barlow_twins": BarlowTwins, "vicreg": VICReg,
}


def method_class(name: str) -> type[SSLMethod]:
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg, num_classes: int) -> SSLMethod:
    return method_class(cfg.method.name)(cfg, num_classes)
