"""Orbax checkpoints: a training run's states, parameter-only checkpoints, and what to resume from.

A run directory `checkpoints/<run_name>/` holds Orbax step folders `<step>/` with three items:
`params`, `opt_state` (Orbax PyTrees) and `meta` (JSON: step, tokens seen, rng, config, and where the data
source was: the corpus fingerprint and, for epochs, the epoch and windows done; checkpoints written before
corpora existed hold the epoch and batch position instead). Sampling and evaluation restore `params` alone.

`Checkpointer` is a run's one Orbax `CheckpointManager`: training opens it once, asks it what to resume from
(`to_resume`), saves through it and closes it once; readers (`read_newest`) open one read-only. A save is
synchronous unless `train.async_checkpoint` asks for Orbax's background write: Orbax then returns once it holds
the arrays in host memory, and the donated state stays safe (on a CPU Orbax keeps views of the device buffers,
and JAX copies a buffer with a live view instead of donating it; tests/test_checkpoint.py checks the bytes on both
JAX lines). Nothing here deletes what a run made: a fresh start and a resume from an older step move the
checkpoints they set aside into `<run>/previous/<timestamp>/`, a name Orbax never reads as a step.
`RunLock` keeps a second training out of a run folder that one is using.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mygpt_jax import compat, distributed
from mygpt_jax.config import MODEL_SHAPE_KEYS, changed_settings
from mygpt_jax.errors import UserError

META_FORMAT = 2  # 1 (no "format" key): the epoch and batch position of the in-memory verdict windows
PREVIOUS = "previous"  # <run>/previous/<timestamp>/: what a fresh start or an older resume set aside
ROTATED = ".rotated"  # <run>/.rotated/<step>/: a step rotated out, moved there whole, deleted after the save



class Checkpointer:
    """The checkpoints of one run folder through one Orbax CheckpointManager, closed once (`with`)."""

    def __init__(self, run_dir: str, max_to_keep: int | None = None, read_only: bool = False,
                 learning_rate: float | None = None, background: bool = False):
        self.run_dir, self.read_only, self.learning_rate = run_dir, read_only, learning_rate
        self.background = background
        self.saved_step: int | None = None  # the newest step of this run on disk, once resumed or saved
        self.writing: int | None = None  # the step a background write is finishing
        self.wait_s = 0.0  # the seconds the caller waited in save() and wait(): what checkpoints cost training
        self._manager = None
        if not (read_only and not os.path.isdir(run_dir)):  # a reader of a folder that is not there sees no steps
            # A reader is not Orbax's read_only (which logs warnings): it just never saves.
            # A step rotated out is renamed away in one move, not deleted file by file where it is: a reader
            # beside the training sees it whole or gone, never half-deleted (which would read as damaged).
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                                   cleanup_tmp_directories=not read_only,
                                                   enable_async_checkpointing=background,
                                                   todelete_subdir=None if read_only else ROTATED)
            self._manager = _listing(lambda: ocp.CheckpointManager(os.path.abspath(run_dir), options=options))

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._manager is not None:
            try:
                self.wait()
            finally:
                self._manager.close()
                self._manager = None
            if not self.read_only:
                self._delete_rotated()

    def wait(self) -> None:
        """Return once the background write (if any) is on disk; its failure is one line naming the step."""
        if self.writing is None:
            return
        start = time.perf_counter()
        try:
            with compat.no_orbax_error_logs(), compat.quiet_failed_futures():
                self._manager.wait_until_finished()
        except Exception as e:
            raise self._not_written(self.writing, e) from e
        finally:
            self.wait_s += time.perf_counter() - start
            self.writing = None
        self._delete_rotated()

    def _delete_rotated(self) -> None:
        rotated = os.path.join(self.run_dir, ROTATED)
        if distributed.is_primary() and os.path.isdir(rotated):
            shutil.rmtree(rotated, ignore_errors=True)

    def steps(self) -> list[int]:
        """The finished steps on disk now (read afresh: another process may have added or rotated some)."""
        if self._manager is None:
            return []
        _listing(self._manager.reload)
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        return (self.steps() or [None])[-1]

    def _restore(self, step: int, **items: ocp.args.CheckpointArgs) -> Any:
        compat.quiet_orbax_leftovers()
        with compat.quiet_failed_futures():
            return self._manager.restore(step, args=ocp.args.Composite(**items))

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of a step (its config, step, ...), without reading any array."""
        try:
            return self._restore(step, meta=ocp.args.JsonRestore())["meta"]
        except Exception as e:  # Orbax raises many types for unreadable data
            raise self._unreadable(step, e, {"meta": ocp.args.JsonRestore()}) from e

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        target = ocp.args.StandardRestore(compat.restore_targets(abstract_params))
        try:
            return self._restore(step, params=target)["params"]
        except Exception as e:
            raise self._unreadable(step, e, {"params": target}) from e

    def restore_state(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any]:
        """(params, opt_state) of `step` shaped like the abstract trees, in buffers of XLA's own."""
        items = {"params": ocp.args.StandardRestore(compat.restore_targets(abstract_params)),
                 "opt_state": ocp.args.StandardRestore(compat.restore_targets(abstract_opt_state))}
        try:
            restored = self._restore(step, **items)
        except Exception as e:
            raise self._unreadable(step, e, items) from e
        return compat.own_buffers((restored["params"], restored["opt_state"]))

    def _unreadable(self, step: int, error: Exception, items: dict) -> UserError:
        """Why `step` could not be restored: gone, damaged (which part; the newest intact older step), or intact
        but of another shape than asked (`Mismatch`)."""
        folder = os.path.join(self.run_dir, str(step))
        vanished = Vanished(f"checkpoint {folder} was removed while it was read (a training beside it rotates its "
                            "checkpoints); read it again")
        for name in items:  # an item that cannot be read as it was written is damaged
            try:  # Orbax 0.11 warns of a restore without a target: it is meant here
                with compat.no_orbax_error_logs():
                    self._restore(step, **{name: ocp.args.JsonRestore() if name == "meta" else
                                           ocp.args.StandardRestore()})
            except Exception as e:  # one try per part, to name the damaged one
                if not os.path.isdir(folder):
                    return vanished
                return Damaged(step, name, reason(e), self._intact_before(step, items))
        if not os.path.isdir(folder):
            return vanished
        return Mismatch(f"checkpoint {folder} does not fit this model ({reason(error)})")

    def _intact_before(self, step: int, items: dict) -> int | None:
        """The newest step before `step` whose parts all read as asked."""
        for older in reversed([s for s in self.steps() if s < step]):
            try:
                self._restore(older, **items)
            except Exception:  # damaged too: try the next older
                continue
            return older
        return None

    def save(self, step: int, params: Any, meta: dict, opt_state: Any = None) -> None:
        """Write step `step`; without `opt_state` it is a parameter-only checkpoint (pretrained weights)."""
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        compat.quiet_orbax_leftovers()
        compat.save_replicas_whole()
        self.wait()  # a failed background write is named as itself, before this step is begun
        start = time.perf_counter()
        try:
            with compat.no_orbax_error_logs(), compat.quiet_failed_futures():
                self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # Orbax and TensorStore raise many types; a full disk is one of them
            raise self._not_written(step, e) from e
        finally:
            self.wait_s += time.perf_counter() - start
        self.saved_step = step
        self.writing = step if self.background else None
        if not self.background:
            self._delete_rotated()

    def _not_written(self, step: int, error: Exception) -> UserError:
        full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            "No space left" in str(error)
        kept = self.latest()
        kept = f"the checkpoint of step {kept} is kept" if kept is not None else "no checkpoint was kept"
        _remove_unfinished(self.run_dir)
        if full:
            return UserError(f"the disk is full: checkpoint {step} could not be written to {self.run_dir} ({kept}); "
                             "free some space and rerun the same command to resume")
        return UserError(f"checkpoint {step} could not be written to {self.run_dir} ({reason(error)}; {kept}); "
                         "rerun the same command to resume")

    def save_state(self, state: Any, meta: dict) -> int:
        """Checkpoint a train state with `meta` and return its update, unless it is already saved (a stop right
        after a periodic save) or not finite (a checkpoint is only ever a state to resume from)."""
        step = int(state.step)
        if step != self.saved_step:
            if not bool(_all_finite(state.params)):
                raise self.diverged(f"the parameters are not finite at update {step}")
            self.save(step, state.params, {"format": META_FORMAT, "step": step, **meta}, state.opt_state)
        return step

    def diverged(self, what: str) -> UserError:
        kept = (f"the checkpoint of update {self.saved_step} is kept; it may have begun to diverge too: "
                f"--config.train.resume_step=N resumes from an older one" if self.saved_step else "nothing was saved")
        return UserError(f"{what}: training diverged ({kept}); lower --config.train.learning_rate (now "
                         f"{self.learning_rate:g}) or clip the gradients (--config.train.grad_clip=1.0)")

    def to_resume(self, config: ml_collections.ConfigDict, say: Callable[[str], None]) -> dict | None:
        """The meta of the step to resume from: the newest, or `train.resume_step` with the newer steps moved
        aside; None (a fresh start) when there is none or `train.resume` is False, which moves the earlier run
        aside. A checkpoint of another model is a UserError."""
        t, steps = config.train, self.steps()
        if not t.resume and (steps or self._earlier_records()):
            say(f"Starting fresh (--config.train.resume=False): {self.set_aside(None)}")
            return None
        if t.resume_step and t.resume_step not in steps:
            raise UserError(f"--config.train.resume_step={t.resume_step} is not a checkpoint of {self.run_dir} "
                            f"(its steps: {', '.join(map(str, steps)) or 'none'})")
        if t.resume_step and steps[-1] > t.resume_step:
            say(f"Resuming from update {t.resume_step} (--config.train.resume_step): "
                f"{self.set_aside(t.resume_step)}")
            steps = self.steps()
        if not steps:
            return None
        meta = self.read_meta(steps[-1])
        diff = changed_settings(meta["config"], config, within=tuple(f"model.{k}" for k in MODEL_SHAPE_KEYS))
        if diff:
            raise UserError(f"the checkpoint in {self.run_dir} was trained with another model ({'; '.join(diff)}); "
                            "use another --config.run_name, or start fresh with --config.train.resume=False (the "
                            f"run is moved into {os.path.join(self.run_dir, PREVIOUS)}/)")
        self.saved_step = steps[-1]
        return meta

    def _earlier_records(self) -> bool:
        return any(n not in NOT_RECORDS for n in os.listdir(self.run_dir))

    def set_aside(self, keep_until: int | None) -> str:
        """Move the steps after `keep_until` (None: the whole earlier run, its records too) into
        <run>/previous/<timestamp>/, every process having seen them first; says where and how much."""
        distributed.barrier("found")
        folder = os.path.join(self.run_dir, PREVIOUS, datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
        if keep_until is None:
            names = [n for n in os.listdir(self.run_dir) if n not in NOT_RECORDS]
        else:
            names = [str(s) for s in self.steps() if s > keep_until]
        size = sum(_size(os.path.join(self.run_dir, n)) for n in names)
        if distributed.is_primary():
            os.makedirs(folder)
            for name in names:
                os.rename(os.path.join(self.run_dir, name), os.path.join(folder, name))
        distributed.barrier("set aside")
        self.steps()  # Orbax reads the steps left
        return f"moved {', '.join(sorted(names, key=_natural))} ({size / 1e6:,.1f} MB) into {folder}"


class Damaged(UserError):
    def __init__(self, step: int, part: str, why: str, intact: int | None):
        self.step, self.part, self.intact = step, part, intact
        fix = (f"the newest intact checkpoint is update {intact}: resume from it with "
               f"--config.train.resume_step={intact} (the newer ones are moved into {PREVIOUS}/)"
               if intact is not None else "no older checkpoint is intact: start fresh with "
               f"--config.train.resume=False (the run is moved into {PREVIOUS}/)")
        super().__init__(f"checkpoint {step} is damaged: its {part} cannot be read ({why}); {fix}")


class Mismatch(UserError):
    """A checkpoint read as it was written, but not into the shapes asked for."""


class Vanished(UserError):
    """A step removed between listing it and reading it."""


def read_newest(run_dir: str, abstract_for: Callable[[dict], Any], note: Callable[[str], None]
                ) -> tuple[int, dict, Any]:
    """(step, meta, params) of the newest finished step that reads, for `sample`, `evaluate` and `export`: a step
    that vanishes while it is read (a training beside it rotating its checkpoints) gives way to the newest one
    left; a damaged one to the newest intact one, with one `note`. `abstract_for(meta)` is the params' shape."""
    tried, damaged = set(), []
    with Checkpointer(run_dir, read_only=True) as checkpoints:
        while True:
            steps = [s for s in checkpoints.steps() if s not in tried]
            if not steps:
                if damaged:
                    raise damaged[0]
                raise NoCheckpoint(f"no checkpoint in {run_dir}")
            tried.add(steps[-1])
            try:
                meta = checkpoints.read_meta(steps[-1])
                params = checkpoints.restore_params(steps[-1], abstract_for(meta))
            except Vanished:
                continue
            except Damaged as e:
                damaged.append(e)
                continue
            if damaged:
                note(f"note: checkpoint {os.path.join(run_dir, str(damaged[0].step))} is damaged (its "
                     f"{damaged[0].part} cannot be read); using update {steps[-1]}, the newest intact one")
            return steps[-1], meta, params


class NoCheckpoint(UserError):
    pass


def resume_position(meta: dict) -> tuple[int, int, int]:
    """(step, epoch, windows done in it) where a resumed checkpoint left the epochs; a checkpoint from before
    corpora (format 1) counted the epoch's position in batches of its own batch size."""
    if meta.get("format", 1) == 1:
        return meta["step"], meta["epoch"], meta["batch_in_epoch"] * meta["config"]["train"]["batch_size"]
    position = meta["data"].get("position")
    return (meta["step"], *position) if position else (0, 0, 0)


def latest_step(run_dir: str) -> int | None:
    with Checkpointer(run_dir, read_only=True) as checkpoints:
        return checkpoints.latest()


def restore_meta(run_dir: str, step: int | None = None) -> dict:
    """The JSON metadata of a checkpoint (default: the latest), without reading any array."""
    with Checkpointer(run_dir, read_only=True) as checkpoints:
        step = checkpoints.latest() if step is None else step
        if step is None:
            raise NoCheckpoint(f"no checkpoint in {run_dir}")
        return checkpoints.read_meta(step)


def save(run_dir: str, step: int, params: Any, meta: dict) -> None:
    """A parameter-only checkpoint (converted pretrained weights, tests)."""
    with Checkpointer(run_dir) as checkpoints:
        checkpoints.save(step, params, meta)


def _listing(read_steps: Callable[[], Any]) -> Any:
    """`read_steps()` (Orbax listing a run's steps), again when a step was removed while it listed them: a
    training beside a reader rotates its checkpoints. Quiet: Orbax warns of a step that went meanwhile."""
    with compat.no_orbax_error_logs():  # nor Orbax's warning of the metadata of a step it saw go
        for _ in range(19):
            try:
                return read_steps()
            except (FileNotFoundError, NotADirectoryError):  # Orbax checks what it found is still a folder
                continue
        return read_steps()  # the last try raises what it meets


def reason(e: Exception) -> str:
    """The first sentence of an Orbax/TensorStore error, without the storage specs some of them append."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.split(r" See full TensorStore details| \{\"|: \{'", first)[0]
    return first if len(first) <= 200 else first[:197] + "..."


@jax.jit
def _all_finite(params: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(params)]))


def _remove_unfinished(run_dir: str) -> None:
    """Delete the temporary folders of a save that failed half-way (Orbax never takes them as checkpoints)."""
    for entry in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if ".orbax-checkpoint-tmp" in entry:
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _natural(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


class RunLock:
    """An exclusive lock on a run folder while a training writes to it: a second training of the same folder
    stops at once with one line naming the first (host, pid, start time). The lock is an flock on
    `<run_dir>/train.lock`, which the system lets go when its process ends however it ends, so a run that was
    killed never leaves the folder locked."""

    NAME = "train.lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self.file = None

    def __enter__(self) -> RunLock:
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"cannot write to the run folder {os.path.dirname(self.path)} ({e.strerror}); make it "
                            "writable, or train into another --config.checkpoint_dir or --config.run_name") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{os.path.dirname(self.path)} is being trained by {_holder(holder)}; wait for it to "
                            "finish, stop it, or train into another --config.run_name") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        self.file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()  # releases the flock; the file stays, naming the last holder


NOT_RECORDS = (PREVIOUS, ROTATED, RunLock.NAME)  # in a run folder, what is not the run's own record


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"process {who['pid']} on {who['host']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
