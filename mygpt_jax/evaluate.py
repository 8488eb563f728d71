"""Cross-entropy and perplexity of a model on a text file.

    python -m mygpt_jax.evaluate --config configs/gpt2_124m.py --config.eval.text_file=my.txt
    python -m mygpt_jax.evaluate --config configs/verdict.py --config.eval.json=True
    python -m mygpt_jax.evaluate --config configs/pystdlib.py --config.eval.split=val   # a prepared corpus's split

The text is cut into windows of the model's context (each token predicted once, from up to
context_length tokens before it); the last, shorter window is padded and masked, so every token after
the first counts exactly once.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from mygpt_jax import backends, corpus, data, prepare, sharding
from mygpt_jax.backends import Backend
from mygpt_jax.errors import UserError
from mygpt_jax.model import GPT, ModelConfig
from mygpt_jax.tokenizer import encode
from mygpt_jax.weights import load_model


def padded_windows(ids: list[int] | np.ndarray, context_length: int, batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(windows (n, context_length + 1), mask (n, context_length)) covering every target once.

    n is a multiple of batch_size; padding windows and positions have mask 0.
    """
    n_targets = len(ids) - 1
    n = max(1, -(-n_targets // context_length))
    n = -(-n // batch_size) * batch_size
    windows = np.zeros((n, context_length + 1), np.int32)
    mask = np.zeros((n, context_length), np.float32)
    for i, start in enumerate(range(0, n_targets, context_length)):
        chunk = ids[start:start + context_length + 1]
        windows[i, :len(chunk)] = chunk
        mask[i, :len(chunk) - 1] = 1.0
    return windows, mask


def evaluate_ids(cfg: ModelConfig, backend: Backend, params: Any, ids: list[int] | np.ndarray, batch_size: int,
                 progress: bool = True, mesh: Any = None) -> tuple[int, float]:
    """(number of predicted tokens, mean cross-entropy in nats)."""
    if len(ids) < 2:
        raise UserError("the text has fewer than 2 tokens; nothing to evaluate")
    model = GPT(cfg, backend)

    @functools.partial(jax.jit, **backend.jit_options())
    def loss_sum(params: Any, windows: jax.Array, mask: jax.Array) -> jax.Array:
        logits, _ = model.apply({"params": params}, windows[:, :-1])
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]) * mask)

    windows, mask = padded_windows(ids, cfg.context_length, batch_size)
    total = jnp.zeros(())
    for i in tqdm(range(0, len(windows), batch_size), unit="batch", disable=not progress or None,
                  file=sys.stderr):
        batch = (windows[i:i + batch_size], mask[i:i + batch_size])
        if mesh is not None:  # the batch's rows split over the mesh, as the weights are
            batch = tuple(sharding.place_rows(part, mesh) for part in batch)
        total = total + loss_sum(params, *batch)
    count = int(mask.sum())
    return count, float(total) / count


def main(config: ml_collections.ConfigDict) -> None:
    if config.eval.split:  # a split of the config's corpus, prepared first if it is not yet
        spec, status = corpus.check(config.data, config.checkpoint_dir)
        prepared = prepare.ready_corpus(spec, status, config.data.workers)
        path, ids = f"{prepared.folder} ({config.eval.split})", getattr(prepared, config.eval.split)
    else:
        path = config.eval.text_file or data.default_text_path()
        ids = encode(data.load_text(path, key="eval.text_file"))
    mesh = sharding.make_mesh(config.mesh)
    cfg, params = load_model(config, mesh)
    tokens, loss = evaluate_ids(cfg, backends.current(), params, ids, config.eval.batch_size, mesh=mesh)
    perplexity = math.exp(loss)
    if config.eval.json:
        print(json.dumps({"tokens": tokens, "loss": loss, "perplexity": perplexity, "text_file": path}))
    else:
        print(f"{path}: {tokens:,} tokens, loss {loss:.4f}, perplexity {perplexity:.2f}")


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)
