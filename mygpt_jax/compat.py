"""Where JAX, Flax, Orbax and optax releases differ: every version shim of the package lives here, each with the
versions it covers, so that dropping an old release is one file's change.

The code runs on jax 0.10.x (Python 3.11), 0.6.2 (Python 3.10) and 0.5.0 (jax-metal's only working JAX); the
pinned versions of each line are in constraints.txt and constraints-jax050.txt.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging as absl_logging


def restore_targets(abstract: Any) -> Any:
    """Placeholders that make Orbax (0.11.5 to 0.12.8) restore jax.Arrays where a sharding says, on the default
    device where none is given: without a sharding Orbax 0.11 restores NumPy arrays and 0.12 warns."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device), abstract)


def own_buffers(tree: Any) -> Any:
    """Restored arrays copied into buffers of XLA's own: training donates the state to its step, and donating
    the restored buffers themselves corrupted the heap with jax 0.5.0 and Orbax 0.11.5 (a resumed run crashed or
    went nan). Harmless, and cheap beside a restore, on the newer lines."""
    return jax.tree.map(jnp.copy, tree)


@contextlib.contextmanager
def no_orbax_error_logs() -> Iterator[None]:
    """Orbax (every pinned version) logs the traceback of every write that failed (one per array and thread)
    through absl before the save raises, 0.11.5 warns of every restore without a target tree, and each warns of
    a step removed while it lists the steps; the one-line error made of that exception says it all."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _orbax_leftover(error: BaseException | None, obj: Any = None) -> bool:
    """An error of Orbax's machinery that outlived a failed read or write: a TensorStore read finishing into
    Orbax's closed event loop, or a coroutine of the failed operation collected unfinished."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and any(part in (code.co_filename or "") for part in ("orbax", "tensorstore", "asyncio"))


@functools.cache  # install the hooks once
def quiet_orbax_leftovers() -> None:
    """When a restore or save fails, Orbax (0.11.5 to 0.12.8) leaves reads in flight and coroutines unfinished;
    Python would print an "Event loop is closed" traceback or "Exception ignored in coroutine" for each (through
    sys.excepthook from TensorStore's threads, or sys.unraisablehook when collected), around the one-line error."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, error, tb: None if _orbax_leftover(error) else excepthook(kind, error, tb)
    sys.unraisablehook = lambda u: None if _orbax_leftover(u.exc_value, u.object) else unraisablehook(u)


def _unretrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


@contextlib.contextmanager
def quiet_failed_futures() -> Iterator[None]:
    """When one of Orbax's reads or writes fails, the others' futures hold the same failure, and asyncio logs each
    as "exception was never retrieved" when it is collected: while Orbax unwinds, or at exit. Within the block
    those logs are dropped; after a failure, for good (the leftovers may be collected later, also after a later
    read of the same checkpoint succeeds, as the diagnosis of a damaged step reads its other parts)."""
    logger = logging.getLogger("asyncio")
    logger.addFilter(_unretrieved)
    try:
        yield
    except BaseException:
        _failed_once.append(True)
        raise
    finally:
        if not _failed_once:
            logger.removeFilter(_unretrieved)


_failed_once: list[bool] = []  # whether a read or write in `quiet_failed_futures` has failed in this process


def _orbax_slices_replicas_under_a_setter(orbax_version: str) -> bool:
    """Orbax after 0.11.28 (commit 5a0bd479), saving a shard that several devices hold, has each of them write a
    slice of it, cut `with jax.sharding.set_mesh(...)` (ReplicaSlice.data in _src/serialization/replica_slices.py);
    jax made `set_mesh` a context manager in 0.7.1: before (0.6.2, the Python 3.10 line, with Orbax 0.11.39) it is
    a plain setter, and every save of a replicated array (any mesh of several devices) raised AttributeError
    __enter__. Orbax 0.11.5 (the jax 0.5.0 line) never slices; 0.12.8 runs on jax 0.10.x."""
    orbax = tuple(int(n) for n in re.findall(r"\d+", orbax_version)[:3])
    return orbax > (0, 11, 28) and not hasattr(getattr(jax.sharding, "set_mesh", None), "__enter__")


@functools.cache  # register the handler once
def save_replicas_whole() -> None:
    """Where Orbax cannot cut replicated shards (`_orbax_slices_replicas_under_a_setter`), one device writes each
    shard whole, as Orbax 0.11.5 always did: its jax.Array handler with replica-parallel saving off, and otherwise
    as Orbax registers it (with the store of the arrays' metadata, which only its private module names)."""
    import orbax.checkpoint as ocp  # here: the optimizer's modules import this one, and need no Orbax

    if not _orbax_slices_replicas_under_a_setter(ocp.__version__):
        return
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                             array_metadata_store=array_metadata_store.Store())
    with no_orbax_error_logs():  # Orbax warns of every handler it replaces
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _muon_applies_shape_factor() -> bool:
    """optax 0.2.5's `scale_by_muon` multiplies each update by sqrt(max(1, fan_out / fan_in)) itself; 0.2.8's (which
    takes `weight_dimension_numbers`, the refactor that moved the factor out to `muon()`'s own chain) does not."""
    return "weight_dimension_numbers" not in inspect.signature(optax.contrib.scale_by_muon).parameters


def scale_by_muon(**kwargs) -> optax.GradientTransformation:
    """`optax.contrib.scale_by_muon(**kwargs)` with the shape factor sqrt(max(1, fan_out / fan_in)) of a (fan_in,
    fan_out) kernel on every optax line: inside it on 0.2.5, applied after it here on 0.2.8, where it also needs the
    leaves' dimension numbers."""
    if _muon_applies_shape_factor():
        return optax.contrib.scale_by_muon(**kwargs)
    # 0.2.8 reads every leaf as a (fan_in, fan_out) matrix only when told so for each leaf.
    matrices = optax.contrib.MuonDimensionNumbers()
    muon = optax.contrib.scale_by_muon(**kwargs, weight_dimension_numbers=lambda tree: jax.tree.map(
        lambda _: matrices, tree))
    factor = optax.stateless(lambda updates, params: jax.tree.map(
        lambda u: u * jnp.sqrt(jnp.maximum(1.0, u.shape[-1] / u.shape[-2])), updates))
    return optax.chain(muon, factor)
