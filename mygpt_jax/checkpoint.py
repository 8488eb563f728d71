"""Orbax checkpoints: a training run's state, and parameter-only checkpoints.

A run directory `checkpoints/<run_name>/` holds Orbax step folders `<step>/` with three items:
`params`, `opt_state` (Orbax PyTrees) and `meta` (JSON: step, epoch, batch position, rng, config).
Sampling and evaluation restore `params` alone. Saving is synchronous: the training step donates its
buffers, so an asynchronous save could read memory the next step already reuses.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

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
    with _manager(run_dir, max_to_keep, create=True) as mngr:
        mngr.save(step, args=ocp.args.Composite(**items), force=True)


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


def _restore(run_dir: str, step: int | None, **items: ocp.args.CheckpointArgs) -> Any:
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise UserError(f"no checkpoint in {run_dir}")
    _quiet_closed_loop()
    with _manager(run_dir) as mngr:
        try:
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
    return restored["params"], restored["opt_state"]


def restore_params(run_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, dict]:
    """(params, meta) of a training run, without reading the optimizer state."""
    restored = _restore(run_dir, step, params=ocp.args.StandardRestore(_on_device(abstract_params)),
                        meta=ocp.args.JsonRestore())
    return restored["params"], restored["meta"]


def restore_meta(run_dir: str, step: int | None = None) -> dict:
    """The JSON metadata of a checkpoint (its config, step, ...), without reading any array."""
    return _restore(run_dir, step, meta=ocp.args.JsonRestore())["meta"]
