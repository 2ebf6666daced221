"""Where the Hydra configs live, and a friendly check of command-line overrides.

Hydra's own errors for a mistyped group option or key are several lines long and end with a hint
about stack traces; a new user should instead see one line that names the setting and what it
may be. ``check_overrides`` runs before Hydra and raises ``ConfigError`` with that line.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A user setting is invalid; the message is one line naming the setting and allowed values."""


def conf_dir() -> Path:
    """The configuration folder: ``conf/`` of a source checkout, else ``ssl_vision/conf`` installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"ssl-vision configs not found next to {here}; reinstall the package")


def group_options(group: str) -> list[str]:
    """Option names of a config group, e.g. ``group_options('backbone')``."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def is_group(key: str) -> bool:
    return (conf_dir() / key).is_dir()


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _values(override) -> list:
    """All values of a parsed override: one for ``a=b``, several for a sweep ``a=b,c``."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return [value]


def _override_args(args: list[str]) -> list[str]:
    """The ``key=value`` overrides among command-line ``args``, parsed by Hydra's own argument parser
    (so flag values such as ``job`` in ``--cfg job`` are not taken for overrides)."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_known_args(args)[0].overrides
    except SystemExit:  # a malformed flag (or --version): Hydra reports it itself
        return []


def check_overrides(args: list[str], config_name: str) -> None:
    """Validate command-line overrides before Hydra sees them (one-line ``ConfigError``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = _override_args(args)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:  # syntax error
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"cannot parse override: {first}") from None

    group_choices, plain = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.package:
            continue
        if is_group(key):
            options = group_options(key)
            for value in _values(o):
                for v in value if isinstance(value, list) else [value]:  # several at once: logger=[csv,tensorboard]
                    if v is None or str(v) == "null":
                        continue
                    if str(v) not in options:
                        raise ConfigError(
                            f"unknown {key} '{v}'{_suggest(str(v), options)}; choose one of: {', '.join(options)}"
                        )
            first = _values(o)[0]
            group_choices.append(f"{key}=[{','.join(map(str, first))}]" if isinstance(first, list) else f"{key}={first}")
        elif not (o.is_add() or o.is_force_add() or o.is_delete()):
            plain.append(key)

    if not plain:
        return
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name=config_name, overrides=group_choices)
    for key in plain:
        if key in {"seed"} or OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, (DictConfig,)):
            valid = [str(k) for k in node.keys()]
            where = f"'{parent}'" if parent else "the top level"
            raise ConfigError(
                f"unknown setting '{key}'{_suggest(leaf, valid)}; valid keys under {where}: {', '.join(valid)}"
            )
        if isinstance(node, ListConfig):
            continue
        raise ConfigError(f"unknown setting '{key}': '{parent}' is not a group of settings")


_MISSING = object()


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}
