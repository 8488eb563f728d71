"""The pure functions training runs: the state, the optimizer, the loss, the train and evaluation steps.

`make_train_step` returns `(state, batch, rng) -> (state, metrics)`; the dropout key of a step is
`fold_in(rng, step)`, so a step's randomness depends on the step alone and a resumed run repeats it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mygpt_jax.data import gather
from mygpt_jax.model import GPT


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of parameter updates done
    params: Any
    opt_state: Any


def learning_rate(t: ml_collections.ConfigDict, total_steps: int) -> optax.ScalarOrSchedule:
    """The constant `train.learning_rate`, or with warmup_steps > 0 a linear warmup from learning_rate /
    warmup_steps (from 0 the first update would change nothing) then a cosine decay to learning_rate *
    min_lr_ratio at `total_steps`."""
    if t.warmup_steps == 0:
        return t.learning_rate
    return optax.warmup_cosine_decay_schedule(
        t.learning_rate / t.warmup_steps, t.learning_rate, t.warmup_steps, max(total_steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.min_lr_ratio)


def create_optimizer(t: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW at `learning_rate(t, total_steps)`, with optional global-norm gradient clipping."""
    adamw = optax.adamw(learning_rate(t, total_steps), b1=t.beta1, b2=t.beta2, eps=t.eps,
                        weight_decay=t.weight_decay, mask=_matrices if t.weight_decay_params == "matrices" else None)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


def _matrices(params: Any) -> Any:
    """The weight-decay mask of train.weight_decay_params="matrices": weights and embeddings, not the 1-D
    biases and LayerNorm parameters."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


@jax.jit
def all_finite(params: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(params)]))


def loss_fn(model: GPT, params: Any, batch: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Mean next-token cross-entropy of a batch of windows (batch, context_length + 1)."""
    rngs = None if rng is None else {"dropout": rng}
    logits, _ = model.apply({"params": params}, batch[:, :-1], deterministic=rng is None, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(model: GPT, tx: optax.GradientTransformation,
                    grad_accum_steps: int) -> Callable[[TrainState, jax.Array, jax.Array], tuple]:
    """A pure step (state, batch, rng) -> (state, metrics); the dropout key is fold_in(rng, step).

    With grad_accum_steps > 1 the batch is split into that many micro-batches whose gradients are
    averaged inside the same compiled function (lax.scan), before one optimizer update.
    """
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(model, p, b, r))

    def train_step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state.step)
        if grad_accum_steps == 1:
            loss, grads = grad_fn(state.params, batch, rng)
        else:
            micro = batch.reshape(grad_accum_steps, -1, batch.shape[-1])

            def accumulate(carry, xs):
                i, b = xs
                loss, grads = grad_fn(state.params, b, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
            loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def jit_train_step(model: GPT, tx: optax.GradientTransformation, grad_accum_steps: int,
                   profile: bool = False) -> Callable:
    """The train step as training runs it (and the bench times it): jitted whole, the state donated.
    `profile=True` compiles it to record every XLA op in a profiler trace (`Backend.jit_options`)."""
    return jax.jit(make_train_step(model, tx, grad_accum_steps), donate_argnums=(0,),
                   **model.backend.jit_options(profile))


def jit_eval_step(model: GPT) -> Callable[[Any, jax.Array], jax.Array]:
    """(params, batch) -> the batch's mean loss, without dropout."""
    return jax.jit(lambda params, batch: loss_fn(model, params, batch, None), **model.backend.jit_options())


def evaluate(eval_step: Callable, params: Any, tokens: np.ndarray, starts: np.ndarray, context_length: int,
             batch_size: int, micro_batch_size: int) -> float:
    """The mean of per-batch mean losses over the windows at `starts` (the seed's calc_loss_loader), each
    batch evaluated in micro-batches (a whole batch's logits may not fit where its gradients were accumulated)."""
    batch_losses = []
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        micro = [eval_step(params, jnp.asarray(gather(tokens, batch[j:j + micro_batch_size], context_length)))
                 for j in range(0, len(batch), micro_batch_size)]
        batch_losses.append(micro)
    return float(np.mean([np.mean(jax.device_get(m)) for m in batch_losses]))
