"""Cross-entropy and perplexity of a model on a text file or a prepared corpus's split.

    python -m mygpt_jax.evaluate --config configs/gpt2_124m.py --config.eval.text_file=my.txt
    python -m mygpt_jax.evaluate --config configs/verdict.py --config.eval.json=True
    python -m mygpt_jax.evaluate --config configs/pystdlib.py --config.eval.split=val   # a prepared corpus's split

A split is scored on the windows every evaluation of the training run scores (`data.scored_windows`: the same
`train.eval_iter`, `train.batch_size`, `data.stride` and `data.sampling`), so on a run's last checkpoint it
prints the validation loss the run logged last. A text file, or a split with `eval.all_tokens=True`, is cut into
windows of the model's context (each token predicted once, from up to context_length tokens before it), the last
one shorter, so every token after the first counts exactly once. Either way the loss is the mean over the
targets scored (`metrics.window_loss`, training's own estimator).
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections
import numpy as np

from mygpt_jax import backends, corpus, data, prepare, sharding, steps
from mygpt_jax.errors import UserError
from mygpt_jax.metrics import window_loss
from mygpt_jax.model import GPT
from mygpt_jax.tokenizer import encode
from mygpt_jax.weights import load_model


def every_token(ids: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens padded at the end, window starts, targets of each window) that predict every token after the first
    exactly once: windows every context_length tokens, the last one shorter."""
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise UserError("the text has fewer than 2 tokens; nothing to evaluate")
    starts = np.arange(0, n_targets, context_length)
    padded = np.concatenate([np.asarray(ids, np.int32), np.zeros(context_length, np.int32)])
    return padded, starts, np.minimum(context_length, n_targets - starts)


def _tokens(config: ml_collections.ConfigDict) -> tuple[str, np.ndarray]:
    """(what it is, its tokens): the text file, or the split of the config's corpus (prepared first if it is not
    yet). Read before the model loads, so that a wrong path is named before anything else."""
    if not config.eval.split:
        path = config.eval.text_file or data.default_text_path()
        return path, np.asarray(encode(data.load_text(path, key="eval.text_file")))
    spec, status = corpus.check(config.data, config.checkpoint_dir)
    prepared = prepare.ready_corpus(spec, status, config.data.workers)
    return f"{prepared.folder} ({config.eval.split})", getattr(prepared, config.eval.split)


def _windows(config: ml_collections.ConfigDict, name: str, tokens: np.ndarray, context_length: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(tokens, window starts, targets per window or None for whole windows): a text file's every token once, a
    split's the windows training scores (every token with eval.all_tokens)."""
    if not config.eval.split or config.eval.all_tokens:
        return every_token(tokens, context_length)
    starts = data.scored_windows(config, tokens, context_length)
    if not len(starts):
        raise UserError(f"{name} has no window of {context_length + 1} tokens; score every token with "
                        "--config.eval.all_tokens=True")
    return tokens, starts, None


def main(config: ml_collections.ConfigDict) -> None:
    path, ids = _tokens(config)
    mesh = sharding.make_mesh(config.mesh)
    cfg, params = load_model(config, mesh)
    tokens, starts, targets = _windows(config, path, ids, cfg.context_length)
    loss_sum: Any = steps.jit_eval_step(GPT(cfg, backends.current()))
    count, loss = window_loss(loss_sum, params, tokens, starts, cfg.context_length, config.eval.batch_size, mesh,
                              targets, progress=True)
    perplexity = math.exp(loss)
    if config.eval.json:
        print(json.dumps({"tokens": count, "loss": loss, "perplexity": perplexity, "text_file": path}))
    else:
        print(f"{path}: {count:,} tokens, loss {loss:.4f}, perplexity {perplexity:.2f}")


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)
