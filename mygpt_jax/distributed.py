"""Several processes of one run (hosts, or processes on one host): `jax.distributed`, joined first of all.

`initialize(config.distributed)` runs before anything else touches JAX (`cli.run`). It joins the processes
from `coordinator_address`, `num_processes` and `process_id`, or with `auto=True` from what jax detects of
the cluster (SLURM, TPU pods, Open MPI). A single process never initializes: a plain run inside a SLURM
allocation of one task stays a plain run. After it, `jax.devices()` lists every process's devices and the
mesh spans them all; every process runs every step, and only process 0 (`is_primary()`) writes what a person
reads. Multi-process runs also get jax's preemption sync point (`preemption.StopSignals` uses it).
"""

from __future__ import annotations

import itertools
import os
import sys

import jax
import ml_collections

from mygpt_jax.errors import UserError

_barriers = itertools.count()  # every barrier of a run has a name of its own
_timeout_s = [600]  # distributed.timeout_s of the run

# What jax.distributed's cluster detection reads, per cluster kind: the number of processes of this job.
_CLUSTER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _cluster_processes() -> int:
    """How many processes the cluster's environment says this job has (1 when it says nothing)."""
    for name in _CLUSTER_SIZES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a TPU pod slice: one process per host
    return len(hosts.split(",")) if hosts else 1


def initialize(d: ml_collections.ConfigDict) -> None:
    """Join the run's processes as `d` (the config's `distributed` section) says; nothing for one process."""
    if d.auto:
        if _cluster_processes() <= 1:
            return
        kwargs = {}
    elif d.num_processes > 1:
        kwargs = {"coordinator_address": d.coordinator_address, "num_processes": d.num_processes,
                  "process_id": d.process_id}
    else:
        return
    # XLA:CPU runs collectives across processes only through gloo; jax 0.5.0 reads no environment variable for it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _keep_native_stdout_apart()
    _timeout_s[0] = d.timeout_s
    try:
        jax.distributed.initialize(initialization_timeout=d.timeout_s, **kwargs)
    except (RuntimeError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        where = (f"coordinator {d.coordinator_address}, process {d.process_id} of {d.num_processes}" if not d.auto
                 else "from the cluster's environment")
        raise UserError(f"the processes could not join ({where}: {reason}); start every process within "
                        f"--config.distributed.timeout_s={d.timeout_s} s of the first, with the same "
                        "coordinator_address and num_processes and each its own process_id") from None


def _keep_native_stdout_apart() -> None:
    """Give Python's stdout a descriptor of its own and send descriptor 1, which native code writes to, to
    /dev/null. gloo writes a "[Gloo] Rank ... is connected to ... peer ranks" line from its own threads as the
    processes connect, at times cut into the command's own lines; XLA and the other native libraries log to
    stderr, and gloo's failures reach Python as exceptions."""
    sys.stdout.flush()
    own = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(own, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)  # noqa: SIM115 - the process's stdout


def is_primary() -> bool:
    """Whether this process writes what a person reads (prints, metrics.jsonl, plots, summaries)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing with one process), for up to distributed.timeout_s. It is the
    coordination service's barrier, not a device collective: XLA:CPU's gloo collectives wait 30 s for the other
    processes, less than one may spend compiling a step on a busy machine, so the processes meet here first."""
    if jax.process_count() > 1:
        from jax._src import distributed as state  # the client jax.distributed.initialize made

        state.global_state.client.wait_at_barrier(f"mygpt_jax:{name}:{next(_barriers)}", _timeout_s[0] * 1000)
