"""What every command-line entry shares: `--config` flags, `--help`, one-line errors, one rule for exit codes.

`run(main)` parses `--config configs/x.py --config.a.b=value` (the file's get_config(), locked so that unknown
keys fail, then each override through `mygpt_jax.overrides`, in order), validates the config, prints the
backend and its devices as the first line on stderr, resolves the config's "auto" values for that backend
(`backends.resolve`), and calls `main(config)`. `run(main, own_args=True)` hands a command that reads its own
arguments (`experiments`) the command line instead, and follows the same rule:

    0    done (also `--help`)
    2    a bad command line or config: a flag, a config file, a key or value, what `config.validate` or the
         backend refuses (a `ConfigError`, raised before or while the command runs)
    1    a failure while running (any other `UserError`: a missing file, no network, a damaged checkpoint)
    130  Ctrl-C

An error is one line, `error: ...`, on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

import ml_collections
from absl import app, flags, logging

from mygpt_jax import backends, distributed, hardware, overrides
from mygpt_jax.config import flatten, validate
from mygpt_jax.errors import ConfigError, Interrupted, UserError

_CONFIG = flags.DEFINE_string("config", None, "A config file with get_config(), e.g. configs/verdict.py; its "
                              "keys are set with --config.<key>=<value> (the keys: mygpt_jax/config.py).")
_overrides: list[str] = []  # the command line's --config.<key>=<value>, taken out before absl parses the rest
HELP_FLAGS = ("-h", "--help", "-?", "--helpfull", "--helpshort")
KEYS_HELP = ("Every setting is a config key, set with --config.<key>=<value> (e.g. --config.train.num_epochs=3). "
             "The keys, their defaults and what each does: mygpt_jax/config.py (base_config). A config's own "
             "values: add --help after --config <file>.")


def config_path() -> str:
    """The config file given on the command line (for messages that show a command to run)."""
    return _CONFIG.value or "configs/<file>.py"


def _fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def exit_status(call: Callable[[], int | None]) -> int:
    """The one rule: `call()`'s own status (None = 0); a ConfigError 2, another UserError 1, Ctrl-C 130, each
    error as one `error: ...` line."""
    try:
        return call() or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted:  # the command has said what it saved
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _usage() -> str:
    """The entry's first docstring line and its example commands, then how to see and set the config keys."""
    doc = (sys.modules["__main__"].__doc__ or "").strip().splitlines()
    examples = [line for line in doc if line.startswith("    ") and "python -m" in line]
    own = flags.FLAGS.main_module_help().strip()
    return "\n".join([*doc[:1], *examples, "", KEYS_HELP] + ["", "Options of this command:", own] * bool(own))


def _print_help() -> NoReturn:
    """`--help`: the usage and, when --config names a file, that config's keys and values; exit 0."""
    print(_usage())
    if _CONFIG.value is not None:
        status = exit_status(lambda: print(f"\nThe keys of {_CONFIG.value} (with the overrides given):\n" + "\n".join(
            f"  {key} = {value!r}" for key, value in flatten(load_config().to_dict()).items())))
        sys.exit(status)
    sys.exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flags (--config, a command's own); the --config.<key> overrides are kept for `load_config`."""
    _overrides[:], rest = overrides.split_args(argv[1:])
    asked_help = bool(set(HELP_FLAGS) & set(rest[:rest.index("--")] if "--" in rest else rest))
    try:
        parsed = flags.FLAGS([argv[0], *(arg for arg in rest if arg not in HELP_FLAGS)])
    except flags.Error as e:
        _fail(" ".join(str(e).split())[:500], 2)
    if asked_help:
        _print_help()
    return parsed


def load_config() -> ml_collections.ConfigDict:
    """The --config file's config with the command line's overrides; a ConfigError names what is wrong."""
    if _CONFIG.value is None:
        raise ConfigError("no config given; pass --config configs/verdict.py (or another file in configs/); "
                          "--help says more")
    config = overrides.load_config(_CONFIG.value)
    overrides.apply_overrides(config, _overrides)
    return config


def _start(main: Callable[[ml_collections.ConfigDict], None], compilation_cache: bool) -> None:
    config = load_config()
    logging.set_verbosity(logging.WARNING)  # Orbax and absl are chatty at INFO
    validate(config)
    distributed.initialize(config.distributed)  # before anything starts JAX's backends
    backend = backends.current()
    print(backends.describe(), file=sys.stderr, flush=True)
    try:
        backends.resolve(config, backend)
    except UserError as e:  # a setting this backend cannot run
        raise ConfigError(str(e)) from None
    if compilation_cache:
        hardware.use_compilation_cache(config.compilation_cache_dir, config.compilation_cache_min_seconds)
    main(config)


def run(main: Callable, compilation_cache: bool = True, own_args: bool = False) -> NoReturn:
    """Run `main(config)` as a command-line program (the `python -m mygpt_jax.X` entries), with the config's
    compilation cache unless `compilation_cache` is False (the benchmark times real compiles). With `own_args`,
    `main(argv)` gets the command line (without the program) and returns its exit status instead."""
    if own_args:
        logging.set_verbosity(logging.WARNING)
        sys.exit(exit_status(lambda: main(sys.argv[1:])))

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}; settings are --config.<key>=<value> (--help says more)", 2)
        sys.exit(exit_status(lambda: _start(main, compilation_cache)))

    app.run(_main, flags_parser=_parse_flags)
