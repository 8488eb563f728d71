"""What every command-line entry shares: `--config` flags, one-line errors, exit codes.

`run(main)` parses `--config configs/x.py --config.a.b=value` (ml_collections config_flags, locked so
that unknown keys fail), validates the config, prints the backend and its devices as the first line on
stderr, resolves the config's "auto" values for that backend (`backends.resolve`), and calls `main(config)`.
A bad flag or a `UserError` prints `error: ...` on one line and exits with status 2 or 1; Ctrl-C exits with
130.
"""

from __future__ import annotations

import re
import sys
import types
from typing import Callable, NoReturn, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mygpt_jax import backends, distributed, hardware
from mygpt_jax.config import validate
from mygpt_jax.errors import Interrupted, UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file with get_config(), e.g. configs/verdict.py.", lock_config=True)
CONFIG_FILE_HINT = "a config file defines get_config() returning an ml_collections.ConfigDict, like configs/verdict.py"


def config_path() -> str:
    """The config file given on the command line (for messages that show a command to run)."""
    return config_flags.get_config_filename(flags.FLAGS["config"]) or "configs/<file>.py"


def _fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _flag_error_message(e: Exception, argv: Sequence[str]) -> str:
    if isinstance(e, AttributeError) and e.name == "get_config" and isinstance(e.obj, types.ModuleType):
        return f"the config file {e.obj.__file__} has no get_config(); {CONFIG_FILE_HINT}"
    raw = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, (KeyError, AttributeError)):  # config_flags' way of saying "no such key"
        raw = raw.replace("\\'", "'").replace("\\n", "\n")
        missing = re.findall(r"'(\w+)'", raw)
        for arg in argv:
            key = arg.split("=", 1)[0].removeprefix("--config.")
            if arg.startswith("--config.") and missing and missing[0] in key.split("."):
                hint = re.search(r"Did you mean \"(\w+)\"", raw)
                parts = key.split(".")
                suggestion = (f" (did you mean '{'.'.join(parts[:parts.index(missing[0])] + [hint.group(1)])}'?)"
                              if hint else "")
                return (f"unknown config key '{key}'{suggestion}; the keys and their defaults are in "
                        "mygpt_jax/config.py")
    return " ".join(line.strip() for line in raw.splitlines() if line.strip())[:500]


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises KeyError/AttributeError/flags.Error/ImportError...
        _fail(_flag_error_message(e, argv), 2)


def run(main: Callable[[ml_collections.ConfigDict], None], compilation_cache: bool = True) -> None:
    """Run `main(config)` as a command-line program (the `python -m mygpt_jax.X` entries), with the config's
    compilation cache unless `compilation_cache` is False (the benchmark times real compiles)."""

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}; settings are --config.<key>=<value>", 2)
        config = _CONFIG.value
        if not flags.FLAGS["config"].present:
            _fail("no config given; pass --config configs/verdict.py (or another file in configs/)", 2)
        try:
            getattr(config, "model", None)  # config_flags reports a file it could not load only when it is used
        except OSError as e:
            reason = str(e).strip().splitlines()[-1].strip()
            _fail(f"cannot load the config file {config_path()}: {reason}; use one of the files in configs/", 2)
        if not isinstance(config, ml_collections.ConfigDict):
            returned = "None" if config is None else f"a {type(config).__name__}"
            _fail(f"the config file {config_path()}: get_config() returned {returned}; {CONFIG_FILE_HINT}", 2)
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
