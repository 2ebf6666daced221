"""Method registry: ``method.name`` -> SSLMethod subclass, or ``method._target_``: a user's own subclass.

``method._target_: my_pkg.MyMethod`` trains a class that lives outside this package (importable: installed,
or on ``PYTHONPATH``). It is called as the built-in ones are, ``MyMethod(cfg, num_classes)``, reads its own
keys from ``cfg.method``, and ``method.name`` stays the run's identity (summary.json, resume, probe).
"""

from __future__ import annotations

import importlib

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
        raise ConfigError(f"method.name: unknown method '{name}'; choose one of: {', '.join(METHODS)} "
                          "(or set method._target_ to your own SSLMethod subclass)")
    return METHODS[name]


def import_object(path: str):
    """The object at the dotted ``path`` (``pkg.module.Class``): the longest importable module prefix, then
    attributes. A module that exists but fails to import raises its own error."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # the module exists; something it imports does not
            if i == 1:
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"empty path '{path}'")


def target_class(target: str, name: str) -> type[SSLMethod]:
    """The class at the dotted path ``target`` (``method._target_``), checked to be an ``SSLMethod`` subclass
    whose ``method.name`` (``name``) is its own: a built-in method's name belongs to that class only."""
    try:
        cls = import_object(str(target))
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, a module that fails at import: one line
        cause = " ".join(f"{type(e).__name__}: {e}".split())
        raise ConfigError(f"method._target_: cannot import '{target}' ({cause}); is its module installed or on "
                          "PYTHONPATH?") from None
    if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
        raise ConfigError(f"method._target_: '{target}' is not a subclass of ssl_vision.methods.base.SSLMethod")
    if name in METHODS and METHODS[name] is not cls:
        raise ConfigError(f"method.name: '{name}' is the built-in {METHODS[name].__name__}; give "
                          f"{cls.__name__} its own name (e.g. method.name={cls.__name__.lower()}): resume, "
                          "probe and results read it")
    return cls


def build_method(cfg, num_classes: int) -> SSLMethod:
    target = cfg.method.get("_target_")
    cls = target_class(target, cfg.method.name) if target else method_class(cfg.method.name)
    return cls(cfg, num_classes)
