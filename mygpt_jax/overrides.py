"""Config files and `--config.<key>=<value>` overrides: the one parser of every command line and of the sweeps.

`load_config(path)` imports a config file and returns its `get_config()`, locked (no key can be added).
`split_args(argv)` takes the overrides out of a command line: `--config.<key>=<value>`, `--config.<key> <value>`
(read as `--config.<key>=<value>`), a bare `--config.<key>` (True for a True/False key) and
`--noconfig.<key>` (False). `parse_override(arg, config)` types an override's text like the key's current
value (`PARSERS`), and `set_value(config, key, value, where)` sets a Python value after checking the key and
its type, as sweep files give them. An unknown key, a wrong type or a malformed override is a `UserError` of
one line that names the key (with the closest existing key as a hint).

A new config key needs nothing here: add it with its default to `config.base_config()` and every command line
and sweep can set it, typed like its default (a str, int, float or bool).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from mygpt_jax.config import flatten
from mygpt_jax.errors import UserError

PREFIX = "--config."
NEGATED_PREFIX = "--noconfig."
CONFIG_FILE_HINT = "a config file defines get_config() returning an ml_collections.ConfigDict, like configs/verdict.py"
KEYS_HINT = "the keys and their defaults are in mygpt_jax/config.py"
TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
_BOOLS = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}


def _parse_bool(text: str) -> bool:
    return _BOOLS[text.lower()]


# How an override's text becomes a value of the type of the key's default (absl's spellings for True/False).
PARSERS: dict[type, Callable[[str], Any]] = {bool: _parse_bool, int: int, float: float, str: str}


# ------------------------------------------------------------------------------------------- config files


def load_module(path: str, what: str, hint: str = "") -> Any:
    """Import a Python file by path (a config or sweep file); a missing or broken file is a UserError that names
    it as `what` (and ends with `hint`)."""
    tail = f"; {hint}" if hint else ""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:  # missing, a folder, unreadable
        raise UserError(f"cannot load {what} {path}: {e}{tail}") from None
    spec = importlib.util.spec_from_file_location(f"_mygpt_{os.path.basename(path).removesuffix('.py')}", path)
    if spec is None:  # importlib reads only files named *.py
        raise UserError(f"{what} {path} is not a Python file; give the path of a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"cannot load {what} {path}: {type(e).__name__}: {e}{tail}") from None
    return module


def load_config(path: str, what: str = "the config file") -> ml_collections.ConfigDict:
    """The locked ConfigDict that the config file's get_config() returns."""
    module = load_module(path, what, "use one of the files in configs/")
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"{what} {path} has no get_config(); {CONFIG_FILE_HINT}")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        returned = "None" if config is None else f"a {type(config).__name__}"
        raise UserError(f"{what} {path}: get_config() returned {returned}; {CONFIG_FILE_HINT}")
    config.lock()
    return config


# ---------------------------------------------------------------------------------------------- overrides


def get_value(config: ml_collections.ConfigDict, key: str) -> Any:
    """config.<dotted key>."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check_key(config: ml_collections.ConfigDict, key: str, where: str = "") -> Any:
    """The current value of a dotted key; an unknown key or a group of keys is a UserError (after `where: `)."""
    keys = flatten(config.to_dict())
    if key in keys:
        return keys[key]
    prefix = f"{where}: " if where else ""
    group = [k for k in keys if k.startswith(f"{key}.")]
    if group:
        raise UserError(f"{prefix}'{key}' is a group of keys, not a value; set one of them, e.g. "
                        f"{PREFIX}{group[0]}=...; {KEYS_HINT}")
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"{prefix}unknown config key '{key}'{hint}; {KEYS_HINT}")


def _kind(config: ml_collections.ConfigDict, key: str, where: str) -> type:
    kind = type(check_key(config, key, where))
    if kind not in PARSERS:
        raise UserError(f"{where}: {key} holds a {kind.__name__}, which no override can set")
    return kind


def set_value(config: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
    """config.<key> = value, checked like a --config override (the key exists, the type matches; an int is a
    number); a UserError starts with `where`."""
    kind = _kind(config, key, where)
    if not (type(value) is kind or (kind is float and type(value) is int)):
        raise UserError(f"{where}: {key} = {value!r} has the wrong type; {key} takes {TYPE_NAMES[kind]}")
    *parents, leaf = key.split(".")
    node = get_value(config, ".".join(parents)) if parents else config
    node[leaf] = kind(value)


def _split(arg: str) -> tuple[str, str, str]:
    return arg.removeprefix(NEGATED_PREFIX if arg.startswith(NEGATED_PREFIX) else PREFIX).partition("=")


def override_key(arg: str) -> str:
    """'--config.train.seed=3' -> 'train.seed'."""
    return _split(arg)[0]


def parse_override(arg: str, config: ml_collections.ConfigDict) -> tuple[str, Any]:
    """'--config.train.learning_rate=1e-3' -> ('train.learning_rate', 0.001), typed like the current value. A bare
    '--config.<key>' is True and '--noconfig.<key>' False, for a True/False key; everything after the first '='
    is the value, '=' and ',' included ('--config.sample.prompt=' is the empty string). An unknown key's message
    names the key alone (the override is plain from it), a bad value's the whole override."""
    negated = arg.startswith(NEGATED_PREFIX)
    key, sep, text = _split(arg)
    check_key(config, key)
    kind = _kind(config, key, arg)
    if negated or not sep:
        if kind is bool and not sep:
            return key, not negated
        raise UserError(f"{arg}: write overrides as {PREFIX}<key>=<value>"
                        + (" (--noconfig. only negates a True/False key)" if negated else ""))
    try:
        return key, PARSERS[kind](text)
    except (KeyError, ValueError):
        raise UserError(f"{arg}: {text!r} is not {TYPE_NAMES[kind]} (the type of {key})") from None


def apply_overrides(config: ml_collections.ConfigDict, args: Sequence[str]) -> list[str]:
    """Parse and set each override in order (a later one wins); returns the keys set."""
    keys = []
    for arg in args:
        key, value = parse_override(arg, config)
        set_value(config, key, value, arg)
        keys.append(key)
    return keys


def is_override(arg: str) -> bool:
    return arg.startswith((PREFIX, NEGATED_PREFIX))


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the overrides, every other argument) of a command line, each override as one argument: `--config.<key>
    <value>` becomes `--config.<key>=<value>` where the next argument does not start with '--'. Arguments after
    '--' are left alone."""
    overrides, rest, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            rest += [arg, *args]
            break
        if not is_override(arg):
            rest.append(arg)
        elif arg.startswith(PREFIX) and "=" not in arg and args and not args[0].startswith("--"):
            overrides.append(f"{arg}={args.pop(0)}")
        else:
            overrides.append(arg)
    return overrides, rest
