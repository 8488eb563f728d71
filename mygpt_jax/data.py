"""Token arrays -> windows of context_length + 1 tokens -> the batch of each training step.

A window holds inputs `w[:-1]` and next-token targets `w[1:]`, as in the seed's GPTDatasetV1. Windows are
offsets into a token array (a prepared corpus's memory map), gathered only when a batch needs them. The
batch of a step is a function of the step and the seed, so a resumed run sees exactly the batches the
uninterrupted run would have seen and a checkpoint holds the step, not an iterator:
- `EpochBatches` (data.sampling="epochs"): non-overlapping windows (every `stride` tokens), shuffled anew
  each epoch from (seed, epoch), epoch after epoch; the seed's way on "The Verdict".
- `RandomBatches` (data.sampling="random"): windows at random offsets drawn from (seed, step), nanoGPT's way.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, NamedTuple

import numpy as np

from mygpt_jax.errors import UserError


def default_text_path() -> str:
    """The bundled copy of Edith Wharton's "The Verdict" (1908, public domain)."""
    return str(resources.files("mygpt_jax") / "assets" / "the-verdict.txt")


def load_text(path: str, key: str = "data.path") -> str:
    """The text of `path` ("" = the bundled verdict, `~` expanded); errors name `key`, the config key that gave it."""
    path = os.path.expanduser(path) or default_text_path()
    if os.path.isdir(path):
        raise UserError(f"data file {path} is a folder, not a text file; point --config.{key} at a UTF-8 text file")
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist; point --config.{key} at a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"convert it to UTF-8 or choose another --config.{key}") from e


def window_starts(n_tokens: int, context_length: int, stride: int) -> np.ndarray:
    """The offsets of every window of context_length + 1 tokens starting every `stride` tokens."""
    return np.arange(0, max(n_tokens - context_length, 0), stride)


def gather(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> np.ndarray:
    """The windows at `starts`: (len(starts), context_length + 1) int32."""
    return np.stack([tokens[s:s + context_length + 1] for s in starts]).astype(np.int32)


class Position(NamedTuple):
    epoch: int  # counted from 0
    windows_done: int  # windows of that epoch trained on before the step


class BatchSource:
    """What the training loop asks of its data, whatever the sampling: the batch of a step (`starts_of`, `batch`,
    `on_mesh`), the number of steps (`total_steps`), where a step stands (`epoch_of`, `position`), whether it ends
    an epoch (`ends_epoch`), and one line describing it (`describe`)."""

    tokens: np.ndarray
    context_length: int
    batch_size: int
    total_steps: int

    def starts_of(self, step: int) -> np.ndarray:
        raise NotImplementedError

    def batch(self, step: int) -> np.ndarray:
        """The windows of step `step`'s batch, gathered on the host: (batch_size, context_length + 1)."""
        return gather(self.tokens, self.starts_of(step), self.context_length)

    def on_mesh(self, step: int, grad_accum_steps: int, batch_sharding: Any) -> Any:
        """The batch of `step` as (micro-batches, rows, tokens) on the mesh; this process gathers only its rows."""
        from mygpt_jax import sharding  # JAX: not for the corpus preparation that imports this module

        starts = self.starts_of(step).reshape(grad_accum_steps, -1)
        return sharding.device_batch(self.tokens, starts, self.context_length, batch_sharding)

    def epoch_of(self, step: int) -> int | None:
        """The epoch (counted from 1) step `step` trains in; None where there are no epochs."""
        return None

    def position(self, step: int) -> Position | None:
        """Where step `step` starts in its epoch (a checkpoint keeps it); None where there are no epochs."""
        return None

    def ends_epoch(self, step: int) -> bool:
        return False

    def describe(self, val_tokens: int) -> str:
        raise NotImplementedError


class EpochBatches(BatchSource):
    """Shuffled non-overlapping windows, epoch after epoch, with the last incomplete batch of an epoch dropped.

    The order of an epoch is a permutation drawn from (seed, epoch). `anchor` is where a resumed run's
    checkpoint was (its step, epoch and windows done): training goes on after the windows its epoch has done,
    even with another batch size. With the anchor at 0 (an uninterrupted run, or the same batch size) the
    batch of a step depends on the step alone. Training lasts `num_epochs` epochs, or `max_steps` steps if fewer
    (0: no limit)."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, batch_size: int, seed: int,
                 anchor: tuple[int, int, int] = (0, 0, 0), num_epochs: int = 1, max_steps: int = 0):
        self.tokens, self.context_length, self.batch_size, self.seed = tokens, context_length, batch_size, seed
        self.stride = stride
        self.starts = window_starts(len(tokens), context_length, stride)
        self.steps_per_epoch = len(self.starts) // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the training split has {len(self.starts)} windows, fewer than one batch of "
                            f"--config.train.batch_size={batch_size}; lower the batch size or use more text")
        self.anchor_step, self.anchor_epoch, self.anchor_windows = anchor
        self._order: tuple[int, np.ndarray] | None = None  # the epoch whose order was drawn last, and that order
        self.total_steps = self.steps_until_epoch(num_epochs)
        self.total_steps = min(self.total_steps, max_steps) if max_steps else self.total_steps

    def position(self, step: int) -> Position:
        """Where step `step` (counted from 0) starts."""
        after = step - self.anchor_step
        left_in_anchor_epoch = (len(self.starts) - self.anchor_windows) // self.batch_size
        if after < left_in_anchor_epoch:
            return Position(self.anchor_epoch, self.anchor_windows + after * self.batch_size)
        after -= left_in_anchor_epoch
        return Position(self.anchor_epoch + 1 + after // self.steps_per_epoch,
                        after % self.steps_per_epoch * self.batch_size)

    def epoch_of(self, step: int) -> int:
        return self.position(step).epoch + 1

    def ends_epoch(self, step: int) -> bool:
        """Whether step `step` trains on the last batch of its epoch."""
        return self.position(step + 1).epoch > self.position(step).epoch

    def steps_until_epoch(self, epochs: int) -> int:
        """The number of steps after which `epochs` epochs are done."""
        left_in_anchor_epoch = (len(self.starts) - self.anchor_windows) // self.batch_size
        return self.anchor_step + left_in_anchor_epoch + (epochs - 1 - self.anchor_epoch) * self.steps_per_epoch

    def starts_of(self, step: int) -> np.ndarray:
        """The offsets of the windows of step `step`'s batch: (batch_size,)."""
        epoch, done = self.position(step)
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))
        return self.starts[self._order[1][done:done + self.batch_size]]

    def describe(self, val_tokens: int) -> str:
        val_windows = len(window_starts(val_tokens, self.context_length, self.stride))
        return (f"{len(self.starts)} training and {val_windows} validation windows of {self.context_length} tokens; "
                f"{self.steps_per_epoch} steps per epoch, {self.total_steps} in all")


class RandomBatches(BatchSource):
    """Windows at offsets drawn uniformly from (seed, step): any window of the tokens, overlapping or not, for
    `max_steps` steps."""

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int, max_steps: int = 0):
        self.tokens, self.context_length, self.batch_size, self.seed = tokens, context_length, batch_size, seed
        self.total_steps = max_steps

    def starts_of(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.context_length, self.batch_size)

    def describe(self, val_tokens: int) -> str:
        return (f"{len(self.tokens):,} training and {val_tokens:,} validation tokens, random windows of "
                f"{self.context_length}; {self.total_steps} steps")


def batch_source(config: Any, tokens: np.ndarray, anchor: tuple[int, int, int] = (0, 0, 0)) -> BatchSource:
    """The training batches `config.data.sampling` asks for, going on from `anchor` (epochs:
    `checkpoint.resume_position`)."""
    t, context_length = config.train, config.model.context_length
    if config.data.sampling == "epochs":
        return EpochBatches(tokens, context_length, config.data.stride or context_length, t.batch_size, t.seed,
                            anchor, t.num_epochs, t.max_steps)
    return RandomBatches(tokens, context_length, t.batch_size, t.seed, t.max_steps)


def evaluation_windows(tokens: np.ndarray, context_length: int, stride: int, count: int, spread: bool
                       ) -> np.ndarray:
    """The offsets of the windows evaluated at every evaluation: the first `count` non-overlapping ones (the
    seed's: the first batches of each split), or with `spread` `count` windows evenly spaced over the tokens
    (a corpus: more of it than its first documents)."""
    if spread:
        last = len(tokens) - context_length - 1
        return np.unique(np.linspace(0, last, count).astype(np.int64)) if last >= 0 else np.zeros(0, np.int64)
    return window_starts(len(tokens), context_length, stride)[:count]


def scored_windows(config: Any, tokens: np.ndarray, context_length: int) -> np.ndarray:
    """The windows of a split that every evaluation of a training run scores (and `evaluate` by default):
    `train.eval_iter` batches of the first windows (epochs), or as many spread over the split (random)."""
    return evaluation_windows(tokens, context_length, config.data.stride or context_length,
                              config.train.eval_iter * config.train.batch_size, config.data.sampling == "random")


def check_split(name: str, n_tokens: int, context_length: int, where: str) -> None:
    if n_tokens < context_length + 1:
        raise UserError(f"the {name} split of {where} has {n_tokens} tokens, fewer than one window of "
                        f"context_length + 1 = {context_length + 1}; use more text, a smaller "
                        "--config.model.context_length or another --config.data.train_ratio")
