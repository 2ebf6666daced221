"""One way for every entry point (``ssl-vision-train``, ``-probe``, ``-views``) to start and to fail.

``entry_point(config_name, run)`` returns the console script's ``main``: it checks the command line's
overrides before Hydra (a mistyped option or key is one line, ``ConfigError``), composes the config
with Hydra, and calls ``run(cfg)``. A ``ConfigError`` is printed as ``error: <one line>`` with exit code
2; an exception that carries an ``exit_code`` (e.g. a training run that stopped on a non-finite loss)
is printed the same way with its code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from .config import ConfigError, check_overrides, conf_dir


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def entry_point(config_name: str, run: Callable[[DictConfig], object]) -> Callable[[], None]:
    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base=None)
    def _hydra_main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except ConfigError as e:
            fail(str(e), 2)
        except Exception as e:  # noqa: BLE001 - only those that say how to exit; the rest propagate
            if not isinstance(getattr(e, "exit_code", None), int):
                raise
            fail(str(e), e.exit_code)

    def main() -> None:
        try:
            check_overrides(sys.argv[1:], config_name)
        except ConfigError as e:
            fail(str(e), 2)
        _hydra_main()

    return main
