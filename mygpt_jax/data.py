"""Text -> 90/10 split by characters -> tokens -> windows of context_length + 1 -> batches.

A window holds inputs `w[:-1]` and next-token targets `w[1:]`, as in the seed's GPTDatasetV1. Batches
are plain NumPy arrays; the training order of each epoch is a permutation drawn from (seed, epoch), so a
run resumed in the middle of an epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Iterator, NamedTuple

import numpy as np

from mygpt_jax.errors import UserError
from mygpt_jax.tokenizer import encode


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


def make_windows(ids: list[int] | np.ndarray, context_length: int, stride: int) -> np.ndarray:
    """All windows of context_length + 1 tokens, starting every `stride` tokens: (n, context_length + 1)."""
    ids = np.asarray(ids, dtype=np.int32)
    starts = np.arange(0, len(ids) - context_length, stride)
    return ids[starts[:, None] + np.arange(context_length + 1)[None, :]]


class Splits(NamedTuple):
    train: np.ndarray  # (n_train, context_length + 1) int32
    val: np.ndarray


def load_splits(path: str, train_ratio: float, context_length: int, stride: int = 0) -> Splits:
    """Split the text by characters, tokenize each part, cut both into windows."""
    text = load_text(path)
    cut = int(train_ratio * len(text))
    windows = []
    for name, part in (("training", text[:cut]), ("validation", text[cut:])):
        ids = encode(part)
        if len(ids) < context_length + 1:
            raise UserError(
                f"the {name} split of {path or default_text_path()} has {len(ids)} tokens, fewer than one "
                f"window of context_length + 1 = {context_length + 1}; use a longer text, a smaller "
                f"--config.model.context_length or another --config.data.train_ratio")
        windows.append(make_windows(ids, context_length, stride or context_length))
    return Splits(*windows)


def num_batches(n_windows: int, batch_size: int, drop_last: bool) -> int:
    return n_windows // batch_size if drop_last else -(-n_windows // batch_size)


def epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled window order of one training epoch, reproducible from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def iterate_batches(windows: np.ndarray, batch_size: int, order: np.ndarray | None = None,
                    drop_last: bool = False, start: int = 0) -> Iterator[np.ndarray]:
    """Batches of windows in `order` (default: as stored), from batch index `start` on."""
    order = np.arange(len(windows)) if order is None else order
    for i in range(start, num_batches(len(windows), batch_size, drop_last)):
        yield windows[order[i * batch_size:(i + 1) * batch_size]]
