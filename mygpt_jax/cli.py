"""What every command-line entry shares: `--config` flags, one-line errors, exit codes.

`run(main)` parses `--config configs/x.py --config.a.b=value` (the file's get_config(), locked so that unknown
keys fail, then each override through `mygpt_jax.overrides`, in order), validates the config, prints the
backend and its devices as the first line on stderr, resolves the config's "auto" values for that backend
(`backends.resolve`), and calls `main(config)`. A bad flag or a `UserError` prints `error: ...` on one line
and exits with status 2 or 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

import ml_collections
from absl import app, flags, logging

from mygpt_jax import backends, distributed, hardware, overrides
from mygpt_jax.config import validate
from mygpt_jax.errors import Interrupted, UserError

_CONFIG = flags.DEFINE_string("config", None, "A config file with get_config(), e.g. configs/verdict.py; its "
                              "keys are set with --config.<key>=<value> (the keys: mygpt_jax/config.py).")
_overrides: list[str] = []  # the command line's --config.<key>=<value>, taken out before absl parses the rest


def config_path() -> str:
    """The config file given on the command line (for messages that show a command to run)."""
    return _CONFIG.value or "configs/<file>.py"


def _fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flags (--config, a command's own); the --config.<key> overrides are kept for `load_config`."""
    _overrides[:], rest = overrides.split_args(argv[1:])
    try:
        return flags.FLAGS([argv[0], *rest])
    except flags.Error as e:
        _fail(" ".join(str(e).split())[:500], 2)


def load_config() -> ml_collections.ConfigDict:
    """The --config file's config with the command line's overrides; a UserError names what is wrong."""
    if _CONFIG.value is None:
        raise UserError("no config given; pass --config configs/verdict.py (or another file in configs/)")
    config = overrides.load_config(_CONFIG.value)
    overrides.apply_overrides(config, _overrides)
    return config


def run(main: Callable[[ml_collections.ConfigDict], None], compilation_cache: bool = True) -> None:
    """Run `main(config)` as a command-line program (the `python -m mygpt_jax.X` entries), with the config's
    compilation cache unless `compilation_cache` is False (the benchmark times real compiles)."""

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}; settings are --config.<key>=<value>", 2)
        try:
            config = load_config()
        except UserError as e:  # a flag error, as absl's own
            _fail(str(e), 2)
        logging.set_verbosity(logging.WARNING)  # Orbax and absl are chatty at INFO
        try:
            validate(config)
            distributed.initialize(config.distributed)  # before anything starts JAX's backends
            backend = backends.current()
            print(backends.describe(), file=sys.stderr, flush=True)
            backends.resolve(config, backend)
            if compilation_cache:
                hardware.use_compilation_cache(config.compilation_cache_dir, config.compilation_cache_min_seconds)
            main(config)
        except UserError as e:
            _fail(str(e), 1)
        except Interrupted:  # the command has said what it saved
            sys.exit(130)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)

    app.run(_main, flags_parser=_parse_flags)
