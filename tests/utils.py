"""Helpers for tests that run the real command-line entries as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def cli_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("COLUMNS", None)
    return env


def run_cli(module: str, *args: str, config: str = TINY, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m mygpt_jax.<module> --config <config> <args>` and capture its output."""
    cmd = [sys.executable, "-m", f"mygpt_jax.{module}", "--config", config, *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, input=input,
                          timeout=timeout)


def popen_cli(module: str, *args: str, config: str = TINY) -> subprocess.Popen:
    cmd = [sys.executable, "-m", f"mygpt_jax.{module}", "--config", config, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def after_the_device_line(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of a command's stderr after its first, which must be the backend and its devices
    (`backends.describe()`): every command prints it once JAX runs, before anything else of its own."""
    from mygpt_jax.backends import describe

    lines = result.stderr.strip().splitlines()
    assert lines and lines[0] == describe(), result.stderr
    return lines[1:]
