"""Config files and `--config.<key>=<value>` overrides: the one parser of every command line and of the sweeps.

`load_config(path)` imports a config file and returns its `get_config()`, locked (no key can be added). The
file builds on the locked `config.base_config()`, so setting a key that does not exist fails on its line; that
line and the closest existing key are in the error, and each value is then checked against its default's type.
`split_args(argv)` takes the overrides out of a command line: `--config.<key>=<value>`, `--config.<key> <value>`
(read as `--config.<key>=<value>`), a bare `--config.<key>` (True for a True/False key) and
`--noconfig.<key>` (False). `parse_override(arg, config)` types an override's text like the key's current
value (`PARSERS`), and `set_value(config, key, value, where)` sets a Python value after checking the key and
its type, as sweep files give them. An unknown key, a wrong type or a malformed override is a `ConfigError` of
one line that names the key (with the closest existing key as a hint).

A new config key needs nothing here: add it with its default to `config.base_config()` and every command line
and sweep can set it, typed like its default (a str, int, float or bool).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from mygpt_jax.config import base_config, flatten, get_value
from mygpt_jax.errors import ConfigError

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
    """Import a Python file by path (a config or sweep file); a missing or broken file is a ConfigError that names
    it as `what` (and ends with `hint`)."""
    tail = f"; {hint}" if hint else ""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:  # missing, a folder, unreadable
        raise ConfigError(f"cannot load {what} {path}: {e}{tail}") from None
    spec = importlib.util.spec_from_file_location(f"_mygpt_{os.path.basename(path).removesuffix('.py')}", path)
    if spec is None:  # importlib reads only files named *.py
        raise ConfigError(f"{what} {path} is not a Python file; give the path of a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"cannot load {what} {path}: {type(e).__name__}: {e}{tail}") from None
    return module


def load_config(path: str, what: str = "the config file") -> ml_collections.ConfigDict:
    """The locked ConfigDict that the config file's get_config() returns, with every key of `base_config()` and
    no other, each value of its default's type."""
    module = load_module(path, what, "use one of the files in configs/")
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{what} {path} has no get_config(); {CONFIG_FILE_HINT}")
    try:
        config = module.get_config()
    except Exception as e:  # any mistake in the file is the user's: one line naming it
        raise ConfigError(_config_file_error(path, what, e)) from None
    if not isinstance(config, ml_collections.ConfigDict):
        returned = "None" if config is None else f"a {type(config).__name__}"
        raise ConfigError(f"{what} {path}: get_config() returned {returned}; {CONFIG_FILE_HINT}")
    check_config(config, f"{what} {path}")
    config.lock()
    return config


def check_config(config: ml_collections.ConfigDict, where: str) -> None:
    """Every key of `base_config()` and no other, each of its default's type (an int in a number key becomes a
    float); a ConfigError (after `where: `) names the first key that is not."""
    defaults, keys = flatten(base_config().to_dict()), flatten(config.to_dict())
    for key in keys:
        if key not in defaults:
            check_key(base_config(), key, where)  # raises: unknown, or a group of keys
    for key, default in defaults.items():
        if key not in keys:
            raise ConfigError(f"{where}: get_config() lacks the key '{key}'; build it on "
                              "mygpt_jax.config.base_config(), like configs/verdict.py")
        value = checked_value(key, keys[key], type(default), where)
        if value is not keys[key]:
            *parents, leaf = key.split(".")
            node = get_value(config, ".".join(parents)) if parents else config
            with node.ignore_type():  # an int after a None has made the field an int
                node[leaf] = value


# What ml_collections' locked and type-safe ConfigDict raise: 'Key "x" does not exist ...', "'x'" (reading),
# "Could not override field 'x' ...".
_UNKNOWN_NAME = re.compile(r"""Key "(\w+)" does not exist|^[\\'"]*(?!Key ")(\w+)""")
_TYPE_NAME = re.compile(r"Could not override field '(\w+)'")


def _config_file_error(path: str, what: str, error: Exception) -> str:
    """One line for an exception raised by a config file's get_config(): the file and line, and for an unknown key
    or a value of the wrong type, the dotted key (from the source line) and the closest key or expected type."""
    here = os.path.abspath(path)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == here]
    where = f"{what} {path}" + (f" line {frames[-1].lineno}" if frames else "")
    source = (frames[-1].line or "") if frames else ""
    text = str(error.args[0]) if error.args else ""
    unknown = _UNKNOWN_NAME.search(text) if isinstance(error, (AttributeError, KeyError)) else None
    wrong_type = _TYPE_NAME.search(text) if isinstance(error, TypeError) else None
    defaults = flatten(base_config().to_dict())
    if unknown:
        name = unknown.group(1) or unknown.group(2)
        return unknown_key_message(_dotted(source, name), defaults, where)
    if wrong_type:
        key = _dotted(source, wrong_type.group(1))
        if any(k.startswith(f"{key}.") for k in defaults):
            return f"{where}: `{source}`: '{key}' is a group of keys, not a value; set one of them"
        key = key if key in defaults else closest_key(key, defaults) or key
        kind = type(defaults.get(key, ""))
        return f"{where}: `{source}`: {key} takes {TYPE_NAMES.get(kind, kind.__name__)}"
    detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return f"cannot load {where}: {detail}; use one of the files in configs/ as a model"


def _dotted(source: str, name: str) -> str:
    """The dotted key that a source line sets: 'c.model.emb_dimm = 3' -> 'model.emb_dimm' (the first name is the
    config's variable); `name` alone where the line does not spell the path."""
    chain = re.search(rf"\b([A-Za-z_]\w*(?:\.\w+)*)\.{re.escape(name)}\b", source)
    return ".".join([*chain.group(1).split(".")[1:], name]) if chain else name


def closest_key(key: str, keys: Iterable[str]) -> str | None:
    """The existing key closest to `key`, compared whole and by as many trailing parts as `key` has (so that
    'emb_dimm' finds 'model.emb_dim')."""
    depth, tails = key.count(".") + 1, {}
    for k in keys:
        parts = k.split(".")
        for end in range(len(parts), 0, -1):  # the key, then its groups ('train' for 'trian')
            tails.setdefault(".".join(parts[max(0, end - depth):end]), ".".join(parts[:end]))
    close = difflib.get_close_matches(key, tails, n=1)
    return tails[close[0]] if close else None


def unknown_key_message(key: str, keys: Iterable[str], where: str = "") -> str:
    close = closest_key(key, keys)
    hint = f" (did you mean '{close}'?)" if close else ""
    return f"{where + ': ' if where else ''}unknown config key '{key}'{hint}; {KEYS_HINT}"


# ---------------------------------------------------------------------------------------------- overrides


def check_key(config: ml_collections.ConfigDict, key: str, where: str = "") -> Any:
    """The current value of a dotted key; an unknown key or a group of keys is a ConfigError (after `where: `)."""
    keys = flatten(config.to_dict())
    if key in keys:
        return keys[key]
    prefix = f"{where}: " if where else ""
    group = [k for k in keys if k.startswith(f"{key}.")]
    if group:
        raise ConfigError(f"{prefix}'{key}' is a group of keys, not a value; set one of them, e.g. "
                        f"{PREFIX}{group[0]}=...; {KEYS_HINT}")
    raise ConfigError(unknown_key_message(key, keys, where))


def _kind(config: ml_collections.ConfigDict, key: str, where: str) -> type:
    kind = type(check_key(config, key, where))
    if kind not in PARSERS:
        raise ConfigError(f"{where}: {key} holds a {kind.__name__}, which no override can set")
    return kind


def set_value(config: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
    """config.<key> = value, checked like a --config override (the key exists, the type matches; an int is a
    number); a ConfigError starts with `where`."""
    value = checked_value(key, value, _kind(config, key, where), where)
    *parents, leaf = key.split(".")
    node = get_value(config, ".".join(parents)) if parents else config
    node[leaf] = value


def checked_value(key: str, value: Any, kind: type, where: str) -> Any:
    """`value` if it is a `kind` (an int for a float key: that float); else a ConfigError after `where: `."""
    if type(value) is kind:
        return value
    if kind is float and type(value) is int:
        return float(value)
    raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; {key} takes "
                      f"{TYPE_NAMES.get(kind, kind.__name__)}")


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
        raise ConfigError(f"{arg}: write overrides as {PREFIX}<key>=<value>"
                        + (" (--noconfig. only negates a True/False key)" if negated else ""))
    try:
        return key, PARSERS[kind](text)
    except (KeyError, ValueError):
        raise ConfigError(f"{arg}: {text!r} is not {TYPE_NAMES[kind]} (the type of {key})") from None


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
