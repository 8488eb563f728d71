"""The completions server as the tests run it: a tiny model's checkpoint (random weights, peaked enough that texts
differ), `python -m mygpt_jax.serve` in a real process on 127.0.0.1 at a free port, and its stop."""

from __future__ import annotations

import dataclasses
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax

from mygpt_jax import checkpoint, overrides
from mygpt_jax.model import ModelConfig, init_params
from tests.utils import REPO, TINY, cli_env

START_TIMEOUT_S = 900  # a server that has not printed its address by then has hung
TINY_STD = 0.3  # a larger init than training's 0.02: the random model's next-token choices are clear-cut


def tiny_model(checkpoint_dir: Path, run_name: str = "tiny", **model: Any) -> tuple[ModelConfig, Any]:
    """Random weights of configs/tiny.py's model (with `model`'s keys changed) saved as the run `run_name` of
    `checkpoint_dir`, which `sample` and `serve` load with --config.run_name."""
    config = overrides.load_config(TINY)
    config.model.init_std, config.model.drop_rate = TINY_STD, 0.0
    config.model.dtype, config.model.attention = "float32", "explicit"
    config.model.update(model)
    cfg = ModelConfig.from_config(config.model)
    params = init_params(cfg, jax.random.key(0))
    checkpoint.save(str(checkpoint_dir / run_name), 1, params, {"config": config.to_dict()})
    return cfg, params


@dataclasses.dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log: Path  # its stderr

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(checkpoint_dir: Path, *overrides: str) -> ServerProcess:
    """Start the server on a free port and wait until it prints its address (everything compiled)."""
    log = checkpoint_dir / f"serve-{len(list(checkpoint_dir.glob('serve-*')))}.log"
    cmd = [sys.executable, "-m", "mygpt_jax.serve", "--config", TINY, f"--config.checkpoint_dir={checkpoint_dir}",
           "--config.serve.port=0", *overrides]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    deadline, line = time.time() + START_TIMEOUT_S, ""
    while not line and proc.poll() is None and time.time() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()  # the address, printed once everything is compiled
    if not line.startswith("serving "):
        proc.kill()
        raise AssertionError(f"no address printed: {line!r}\n{log.read_text()}")
    return ServerProcess(proc, line.split(" at ")[1].split()[0], log)
