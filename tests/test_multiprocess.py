"""One run in two real processes on 127.0.0.1 (jax.distributed), two CPU devices each: the documented command line.

The processes compile side by side on this machine's cores, so each waits for the other at its first
collective: the join and collective timeouts (distributed.timeout_s) are generous. The file runs on one
pytest-xdist worker (--dist loadfile), so no other test's processes compete with these two.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.utils import REPO, TINY, checkpoint_steps, devices_env, read_metrics

RUN = ["--config.train.flops_matmul_size=0", "--config.train.num_epochs=3", "--config.train.eval_freq=20",
       "--config.train.checkpoint_every=1000", "--config.model.drop_rate=0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(ckpt, *args: str) -> list[str]:
    return [sys.executable, "-m", "mygpt_jax.train", "--config", TINY, f"--config.checkpoint_dir={ckpt}", *RUN, *args]


def two_processes(ckpt, *args: str) -> list[subprocess.Popen]:
    """`python -m mygpt_jax.train ... --config.distributed.process_id=i` for i = 0, 1, as docs/scaling.md says."""
    port = free_port()
    return [subprocess.Popen(train_command(ckpt, *args, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                           "--config.distributed.num_processes=2",
                                           f"--config.distributed.process_id={i}"),
                             cwd=REPO, env=devices_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, once it ends."""
    ended = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        ended.append((p.returncode, out, err))
    return ended


def losses(run_dir) -> np.ndarray:
    return np.asarray([[r["update"], r["tokens_seen"], r["train_loss"], r["val_loss"]] for r in read_metrics(run_dir)])


def test_two_processes_train_one_run_stop_together_and_resume(tmp_path):
    # The same run in one process with 4 devices: the mesh (4 on data) the two processes make together.
    reference = subprocess.run(train_command(tmp_path / "one"), cwd=REPO, env=devices_env(4), capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    procs = two_processes(tmp_path / "two")
    metrics = tmp_path / "two" / "tiny" / "metrics.jsonl"
    deadline = time.time() + 400
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # a preemption of the second host
    (status0, out0, err0), (status1, out1, err1) = finish(procs)
    assert status0 == status1 == 130, (err0[-2000:], err1[-2000:])
    for err in (err0, err1):  # the notice went through jax's preemption notifier: the one who got it is not told
        assert "Stopped by a signal to a process of the run: saved update " in err and "Traceback" not in err, err
    saved = int(err0.split("saved update ")[1].split()[0])
    assert saved == int(err1.split("saved update ")[1].split()[0]) and 21 <= saved < 108  # the same step
    assert checkpoint_steps(tmp_path / "two" / "tiny") == [saved]
    assert "Ep 1 (Step 000000)" in out0 and out1 == ""  # the first process alone prints; gloo nothing
    assert err0.splitlines()[0].endswith("4 devices, process 0 of 2")
    assert err1.splitlines()[0].endswith("4 devices, process 1 of 2")

    resumed = finish(two_processes(tmp_path / "two"))
    assert [r[0] for r in resumed] == [0, 0], [r[2][-2000:] for r in resumed]
    assert f"Resuming {tmp_path / 'two' / 'tiny'} from update {saved}" in resumed[0][1]
    assert resumed[1][1] == ""
    epoch_ends = sum(step >= saved for step in (35, 71, 107))  # a sample after each, by the first process
    assert resumed[0][1].count("Every effort moves you") == epoch_ends
    # ... and writes metrics.jsonl: each evaluation once, the losses of one process with the same 4 devices.
    two, one = losses(tmp_path / "two" / "tiny"), losses(tmp_path / "one" / "tiny")
    np.testing.assert_array_equal(two[:, :2], one[:, :2])
    np.testing.assert_allclose(two[:, 2:], one[:, 2:], rtol=1e-5)
