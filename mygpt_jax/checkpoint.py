"""Orbax checkpoints: a training run's state, and parameter-only checkpoints.

A run directory `checkpoints/<run_name>/` holds Orbax step folders `<step>/` with three items:
`params`, `opt_state` (Orbax PyTrees) and `meta` (JSON: step, tokens seen, rng, config, and where the data
source was: the corpus fingerprint and, for epochs, the epoch and windows done; checkpoints written before
corpora existed hold the epoch and batch position instead). Sampling and evaluation restore `params` alone.
Saving is synchronous: the training step donates its buffers, so an asynchronous save could read memory
the next step already reuses. `RunLock` keeps a second training out of a run folder that one is using.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from mygpt_jax.errors import UserError


def _manager(run_dir: str, max_to_keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(run_dir), options=options)


def latest_step(run_dir: str) -> int | None:
    if not os.path.isdir(run_dir):
        return None
    with _manager(run_dir) as mngr:
        return mngr.latest_step()


def save(run_dir: str, step: int, params: Any, meta: dict, opt_state: Any = None,
         max_to_keep: int | None = None) -> None:
    """Write step `step`; without `opt_state` it is a parameter-only checkpoint (pretrained weights)."""
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    _quiet_closed_loop()
    try:
        with _manager(run_dir, max_to_keep, create=True) as mngr, _no_error_logs(), _quiet_failed_reads_and_writes():
            mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # Orbax and TensorStore raise many types; a full disk is one of them
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e)
        kept = latest_step(run_dir)
        kept = f"the checkpoint of step {kept} is kept" if kept is not None else "no checkpoint was kept"
        _remove_unfinished(run_dir)
        if full:
            raise UserError(f"the disk is full: checkpoint {step} could not be written to {run_dir} ({kept}); free "
                            "some space and rerun the same command to resume") from e
        raise UserError(f"checkpoint {step} could not be written to {run_dir} ({_reason(e)}; {kept}); rerun the "
                        "same command to resume") from e


@contextlib.contextmanager
def _no_error_logs() -> Iterator[None]:
    """Orbax logs the traceback of every write that failed (one per array and thread) before the save raises;
    the one-line error made of that exception says it all."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _remove_unfinished(run_dir: str) -> None:
    """Delete the temporary folders of saves that failed half-way (Orbax never takes them as checkpoints)."""
    import shutil

    for entry in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if ".orbax-checkpoint-tmp" in entry:
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def delete_all(run_dir: str) -> None:
    with _manager(run_dir) as mngr:
        for step in mngr.all_steps():
            mngr.delete(step)


def _on_device(abstract: Any) -> Any:
    """Placeholders that make Orbax restore jax.Arrays (on the default device unless a sharding is given)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device), abstract)


def _reason(e: Exception) -> str:
    """The first sentence of an Orbax/TensorStore error, without the storage specs some of them append."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.split(r" See full TensorStore details| \{\"|: \{'", first)[0]
    return first if len(first) <= 200 else first[:197] + "..."


def _is_closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


@functools.cache  # install the hooks once
def _quiet_closed_loop() -> None:
    """When a restore fails, the TensorStore reads still in flight finish into Orbax's closed event loop, and
    Python would print an "Event loop is closed" traceback for each (through sys.excepthook from TensorStore's
    threads, or sys.unraisablehook), even before the error reaches us: noise around the one-line error."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, error, tb: None if _is_closed_loop(error) else excepthook(kind, error, tb)
    sys.unraisablehook = lambda u: None if _is_closed_loop(u.exc_value) else unraisablehook(u)


def _unretrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


@contextlib.contextmanager
def _quiet_failed_reads_and_writes() -> Iterator[None]:
    """When one of Orbax's reads or writes fails, the others' futures hold the same failure, and asyncio logs each
    as "exception was never retrieved" when it is collected: while Orbax unwinds, or at exit, around the one-line
    error that already says it. Within the block those logs are dropped; after a failure, for good."""
    logger = logging.getLogger("asyncio")
    logger.addFilter(_unretrieved)
    yield  # an exception leaves the filter in place: the leftovers may be collected later
    logger.removeFilter(_unretrieved)


def _restore(run_dir: str, step: int | None, **items: ocp.args.CheckpointArgs) -> Any:
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise UserError(f"no checkpoint in {run_dir}")
    _quiet_closed_loop()
    with _manager(run_dir) as mngr:
        try:
            with _quiet_failed_reads_and_writes():
                return mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for unreadable or mismatched data
            older = [s for s in mngr.all_steps() if s < step]
            fix = f"delete that folder to use step {max(older)} instead" if older else "delete that folder"
            raise UserError(f"checkpoint {os.path.join(run_dir, str(step))} could not be restored ({_reason(e)}); "
                            f"{fix} (training: or start fresh with --config.train.resume=False)") from e


def restore_train_state(run_dir: str, abstract_params: Any, abstract_opt_state: Any,
                        step: int | None = None) -> tuple[Any, Any]:
    """(params, opt_state) of `step` (default: the latest) shaped like the abstract trees; its meta, which
    says whether they fit, comes from `restore_meta`."""
    restored = _restore(run_dir, step, params=ocp.args.StandardRestore(_on_device(abstract_params)),
                        opt_state=ocp.args.StandardRestore(_on_device(abstract_opt_state)))
    # Copied into buffers of XLA's own: training donates the state to its step, and donating the restored
    # buffers themselves corrupted the heap with jax 0.5.0 and Orbax 0.11.5 (a resumed run crashed or went nan).
    return jax.tree.map(jnp.copy, (restored["params"], restored["opt_state"]))


def restore_params(run_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, dict]:
    """(params, meta) of a training run, without reading the optimizer state."""
    restored = _restore(run_dir, step, params=ocp.args.StandardRestore(_on_device(abstract_params)),
                        meta=ocp.args.JsonRestore())
    return restored["params"], restored["meta"]


def restore_meta(run_dir: str, step: int | None = None) -> dict:
    """The JSON metadata of a checkpoint (its config, step, ...), without reading any array."""
    return _restore(run_dir, step, meta=ocp.args.JsonRestore())["meta"]


class RunLock:
    """An exclusive lock on a run folder while a training writes to it: a second training of the same folder
    stops at once with one line naming the first (host, pid, start time). The lock is an flock on
    `<run_dir>/train.lock`, which the system lets go when its process ends however it ends, so a run that was
    killed never leaves the folder locked."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "train.lock")
        self.file = None

    def __enter__(self) -> RunLock:
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                who = json.loads(holder)
                who = f"process {who['pid']} on {who['host']}, started {who['started']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise UserError(f"{os.path.dirname(self.path)} is being trained by {who}; wait for it to finish, stop "
                            "it, or train into another --config.run_name") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        self.file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()  # releases the flock; the file stays, naming the last holder
