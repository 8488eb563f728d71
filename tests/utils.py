"""Helpers for tests that run the real command-line entries as subprocesses."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
# configs/tiny.py trained for 2 epochs (72 updates): evaluations every 5 steps, checkpoints every 10 (70 and 72 kept);
# the suite trains it once (conftest.py's `tiny_run`).
TINY_RUN = ["--config.train.num_epochs=2", "--config.train.eval_freq=5", "--config.train.checkpoint_every=10",
            "--config.sample.num_samples=2",  # the sample command's setting: training still prints one per epoch
            "--config.train.flops_matmul_size=256"]  # the Speed line and flops_fraction, from a quick measurement


# XLA's lowest optimization level, for the suite's own processes only (conftest.py): they compile hundreds of small
# programs that each run a few times, in about two thirds of the time. The commands the tests run keep the flags a
# user has (`cli_env`): their trained runs are slower at that level (docs/development.md).
QUICK_COMPILE = "--xla_backend_optimization_level=0"


def cli_env() -> dict:
    """The environment of a command a test runs, as a user's shell has it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("COLUMNS", None)
    flags = env.pop("XLA_FLAGS", "").replace(QUICK_COMPILE, "").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    return env


def devices_env(n: int, *flags: str) -> dict:
    """`cli_env()` with `n` CPU devices (XLA's host-platform device count, read as jax starts) and `flags`."""
    env = cli_env()
    devices = f"--xla_force_host_platform_device_count={n}"
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), devices, *flags]))
    for proxy in ("no_proxy", "NO_PROXY"):  # jax.distributed warns of any proxy setting; tests talk to 127.0.0.1 only
        env.pop(proxy, None)
    return env


def json_on_devices(module: str, function: str, n: int = 4) -> dict:
    """What `module.function()` returns (JSON), computed in a child process with `n` CPU devices."""
    code = f"import json; from {module} import {function}; print(json.dumps({function}()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=devices_env(n, QUICK_COMPILE),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_cli(module: str, *args: str, config: str = TINY, input: str | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m mygpt_jax.<module> --config <config> <args>` and capture its output."""
    cmd = [sys.executable, "-m", f"mygpt_jax.{module}", "--config", config, *args]
    return subprocess.run(cmd, cwd=REPO, env=env or cli_env(), capture_output=True, text=True, input=input,
                          timeout=timeout)


def popen_cli(module: str, *args: str, config: str = TINY) -> subprocess.Popen:
    cmd = [sys.executable, "-m", f"mygpt_jax.{module}", "--config", config, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_mid_run(sig: int, run_dir, *args: str) -> tuple[int, str]:
    """Start `python -m mygpt_jax.train <args>` and send it `sig` once its metrics.jsonl in `run_dir` holds two
    records (mid-run, after a step); (its exit status, its stderr)."""
    proc = popen_cli("train", *args)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and _count_lines(metrics) >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _count_lines(path: str) -> int:
    with open(path) as f:
        return f.read().count("\n")


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(d) for d in os.listdir(run_dir) if d.isdigit())


WORDS = ("the", "a", "verdict", "Gisburn", "picture", "café", "naïve", "1908", "x=1;", "(", ")", "def", "—", "日本")


def words(rng: random.Random, n: int) -> str:
    """Text of `n` words with spaces, tabs, blank lines and indentation between them."""
    gaps = (" ", " ", " ", "  ", "\n", "\n\n", "\n    ", " \n", "\t", ".\n")
    return "".join(rng.choice(WORDS) + rng.choice(gaps) for _ in range(n))


def in_small_filesystem(megabytes: int, folder, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` with a tmpfs of `megabytes` mounted on `folder`: a real full disk, in a user and mount
    namespace (no root needed); skipped where the system allows no user namespaces."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("this kernel does not allow user namespaces: no way to mount a small filesystem")
    script = f'mount -t tmpfs -o size={megabytes}m tmpfs "{folder}" && exec "$@"'
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


def after_the_device_line(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of a command's stderr after its first, which must be the backend and its devices
    (`backends.describe()`): every command prints it once JAX runs, before anything else of its own."""
    from mygpt_jax.backends import describe

    lines = result.stderr.strip().splitlines()
    assert lines and lines[0] == describe(), result.stderr
    return lines[1:]


def assert_mesh_step_matches(out: dict, shape: str) -> None:
    """`out` (a 4-device subprocess's report: the single-device losses, and per mesh shape its losses and largest
    state difference) shows the step on mesh `shape` computing the single-device step, and the model training."""
    import numpy as np

    assert out["devices"] == 4 and out["single"][1] < out["single"][0]  # it trains
    np.testing.assert_allclose(out[shape]["losses"], out["single"], rtol=1e-5)
    assert out[shape]["max_diff"] < 1e-5


def two_sharded_steps(cfg, tx, mesh, tokens, starts) -> tuple[list[float], object]:
    """Two train steps of 2 micro-batches (`starts`: (2, rows) window offsets into `tokens`, moved on by one token
    for the second) on `mesh`, made as training makes them: (the losses, the state after them). The second step
    runs the first's compiled program."""
    import jax

    from mygpt_jax import backends, sharding, steps
    from mygpt_jax.model import GPT

    model = GPT(cfg, backends.current(), sharding.activation_constraint(mesh))
    shardings, batch_sharding = sharding.state_shardings(cfg, mesh, tx), sharding.batch_sharding(mesh)
    state = steps.init_state(cfg, tx, jax.random.key(0), shardings)
    step = steps.jit_train_step(model, tx, 2, state_shardings=shardings, batch_sharding=batch_sharding)
    losses = []
    for i in range(2):
        batch = sharding.device_batch(tokens, starts + i, cfg.context_length, batch_sharding)
        state, metrics = step(state, batch, jax.device_put(jax.random.key(1), sharding.replicated(mesh)))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    return losses, state


def user_error_as_nobody(fn, home=None) -> str:
    """The UserError message of fn() ('' if it raises none), run in a forked child that gives up root for `nobody`
    first when this process is root (root reads and writes past any permission), with HOME at `home` if given."""
    from mygpt_jax.errors import UserError

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            if home is not None:
                os.environ["HOME"] = str(home)
            fn()
            os.write(write, b"")
        except UserError as e:
            os.write(write, str(e).encode())
        except BaseException as e:  # reported to the parent, which fails the test
            os.write(write, f"unexpected {type(e).__name__}: {e}".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message
