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
from typing import NamedTuple

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


class EpochBatches:
    """Shuffled non-overlapping windows, epoch after epoch, with the last incomplete batch of an epoch dropped.

    The order of an epoch is a permutation drawn from (seed, epoch). `anchor` is where a resumed run's
    checkpoint was (its step, epoch and windows done): training goes on after the windows its epoch has done,
    even with another batch size. With the anchor at 0 (an uninterrupted run, or the same batch size) the
    batch of a step depends on the step alone."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, batch_size: int, seed: int,
                 anchor: tuple[int, int, int] = (0, 0, 0)):
        self.tokens, self.context_length, self.batch_size, self.seed = tokens, context_length, batch_size, seed
        self.starts = window_starts(len(tokens), context_length, stride)
        self.steps_per_epoch = len(self.starts) // batch_size
        self.anchor_step, self.anchor_epoch, self.anchor_windows = anchor
        self._order: tuple[int, np.ndarray] | None = None  # the epoch whose order was drawn last, and that order

    def position(self, step: int) -> Position:
        """Where step `step` (counted from 0) starts."""
        after = step - self.anchor_step
        left_in_anchor_epoch = (len(self.starts) - self.anchor_windows) // self.batch_size
        if after < left_in_anchor_epoch:
            return Position(self.anchor_epoch, self.anchor_windows + after * self.batch_size)
        after -= left_in_anchor_epoch
        return Position(self.anchor_epoch + 1 + after // self.steps_per_epoch,
                        after % self.steps_per_epoch * self.batch_size)

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

    def batch(self, step: int) -> np.ndarray:
        return gather(self.tokens, self.starts_of(step), self.context_length)


class RandomBatches:
    """Windows at offsets drawn uniformly from (seed, step): any window of the tokens, overlapping or not."""

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int):
        self.tokens, self.context_length, self.batch_size, self.seed = tokens, context_length, batch_size, seed

    def starts_of(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.context_length, self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        return gather(self.tokens, self.starts_of(step), self.context_length)


def evaluation_windows(tokens: np.ndarray, context_length: int, stride: int, count: int, spread: bool
                       ) -> np.ndarray:
    """The offsets of the windows evaluated at every evaluation: the first `count` non-overlapping ones (the
    seed's: the first batches of each split), or with `spread` `count` windows evenly spaced over the tokens
    (a corpus: more of it than its first documents)."""
    if spread:
        last = len(tokens) - context_length - 1
        return np.unique(np.linspace(0, last, count).astype(np.int64)) if last >= 0 else np.zeros(0, np.int64)
    return window_starts(len(tokens), context_length, stride)[:count]


def check_split(name: str, n_tokens: int, context_length: int, where: str) -> None:
    if n_tokens < context_length + 1:
        raise UserError(f"the {name} split of {where} has {n_tokens} tokens, fewer than one window of "
                        f"context_length + 1 = {context_length + 1}; use more text, a smaller "
                        "--config.model.context_length or another --config.data.train_ratio")
