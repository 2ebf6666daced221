"""One way for every entry point (``ssl-vision-train``, ``-probe``, ``-views``) to start and to fail.

``entry_point(config_name, run)`` returns the console script's ``main``: it checks the command line's
overrides before Hydra (a mistyped option or key is one line, ``ConfigError``), lets ``argv`` add the
overrides every rank must share (the training run directory), composes the config with Hydra and
calls ``run(cfg)`` inside ``guard(cfg)`` (training: the signal handling of ``ssl_vision.preemption``).

How it ends: a ``ConfigError`` prints ``error: <one line>`` and exits 2; an exception that carries an
``exit_code`` prints the same (a run that stopped on a non-finite loss: 1), or, when it is an
interruption (``preemption.Interrupted``: the step reached is saved), logs its line on rank 0 and
exits 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from .config import ConfigError, check_overrides, conf_dir

log = logging.getLogger("ssl_vision")


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class RunFailed(RuntimeError):
    """A run stopped (e.g. a non-finite loss); the message says why and what was kept; exit code 1."""

    exit_code = 1


def entry_point(config_name: str, run: Callable[[DictConfig], object],
                argv: Callable[[list[str]], list[str]] | None = None,
                guard: Callable[[DictConfig], contextlib.AbstractContextManager] | None = None
                ) -> Callable[[], None]:
    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base=None)
    def _hydra_main(cfg: DictConfig) -> None:
        from .preemption import Interrupted

        try:
            with guard(cfg) if guard is not None else contextlib.nullcontext():
                run(cfg)
        except Interrupted as e:  # the step reached is saved (ssl_vision/preemption.py)
            from lightning.pytorch.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank == 0:
                log.warning("%s", e)
            sys.exit(e.exit_code)
        except ConfigError as e:
            fail(str(e), 2)
        except Exception as e:  # noqa: BLE001 - only those that say how to exit; the rest propagate
            if not isinstance(getattr(e, "exit_code", None), int):
                raise
            fail(str(e), e.exit_code)

    def main() -> None:
        try:
            check_overrides(sys.argv[1:], config_name)
            if argv is not None:
                sys.argv += argv(sys.argv[1:])
        except ConfigError as e:
            fail(str(e), 2)
        _hydra_main()

    return main
