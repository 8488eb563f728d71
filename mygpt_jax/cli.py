"""What every command-line entry shares: `--config` flags, one-line errors, exit codes.

`run(main)` parses `--config configs/x.py --config.a.b=value` (ml_collections config_flags, locked so
that unknown keys fail), validates the config, and calls `main(config)`. A bad flag or a `UserError`
prints `error: ...` on one line and exits with status 2 or 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mygpt_jax import hardware
from mygpt_jax.config import validate
from mygpt_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file with get_config(), e.g. configs/verdict.py.", lock_config=True)


def config_path() -> str:
    """The config file given on the command line (for messages that show a command to run)."""
    return config_flags.get_config_filename(flags.FLAGS["config"]) or "configs/<file>.py"


def _fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _flag_error_message(e: Exception, argv: Sequence[str]) -> str:
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
        if config is None:
            _fail("no config given; pass --config configs/verdict.py (or another file in configs/)", 2)
        try:
            config.get("model")  # config_flags reports a file it could not load only when it is used
        except OSError as e:
            reason = str(e).strip().splitlines()[-1].strip()
            _fail(f"cannot load the config file {config_path()}: {reason}; use one of the files in configs/", 2)
        logging.set_verbosity(logging.WARNING)  # Orbax and absl are chatty at INFO
        try:
            validate(config)
            if compilation_cache:
                hardware.use_compilation_cache(config.compilation_cache_dir, config.compilation_cache_min_seconds)
            main(config)
        except UserError as e:
            _fail(str(e), 1)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)

    app.run(_main, flags_parser=_parse_flags)
