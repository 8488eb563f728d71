"""The pure functions training runs: the state, the optimizer, the loss, the train and evaluation steps.

`make_train_step` returns `(state, batch, rng) -> (state, metrics)`; the dropout key of a step is
`fold_in(rng, step)`, so a step's randomness depends on the step alone and a resumed run repeats it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mygpt_jax import muon
from mygpt_jax.model import GPT, ModelConfig, init_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of parameter updates done
    params: Any
    opt_state: Any


def new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array, shardings: TrainState
               ) -> TrainState:
    """A fresh state made where `shardings` lay it out (`sharding.state_shardings`), never whole on one device."""
    return jax.jit(lambda rng: new_state(init_params(cfg, rng), tx), out_shardings=shardings)(rng)


def learning_rate(t: ml_collections.ConfigDict, total_steps: int, peak: float | None = None) -> optax.ScalarOrSchedule:
    """The constant `peak` (default `train.learning_rate`), or with warmup_steps > 0 a linear warmup from peak /
    warmup_steps (from 0 the first update would change nothing) then a cosine decay to peak * min_lr_ratio at
    `total_steps`."""
    peak = t.learning_rate if peak is None else peak
    if t.warmup_steps == 0:
        return peak
    return optax.warmup_cosine_decay_schedule(
        peak / t.warmup_steps, peak, t.warmup_steps, max(total_steps, t.warmup_steps + 1),
        end_value=peak * t.min_lr_ratio)


def create_optimizer(t: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW at `learning_rate(t, total_steps)`, or with train.optimizer="muon" Muon for the hidden matrices and
    that AdamW for the rest (mygpt_jax/muon.py); with optional global-norm gradient clipping of all gradients."""
    tx = optax.adamw(learning_rate(t, total_steps), b1=t.beta1, b2=t.beta2, eps=t.eps,
                     weight_decay=t.weight_decay, mask=_matrices if t.weight_decay_params == "matrices" else None)
    if t.get("optimizer", "adamw") == "muon":
        tx = muon.split_optimizer(t, learning_rate(t, total_steps, t.muon_learning_rate), tx)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), tx) if t.grad_clip > 0 else tx


def _matrices(params: Any) -> Any:
    """The weight-decay mask of train.weight_decay_params="matrices": weights and embeddings, not the 1-D
    biases and LayerNorm parameters."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def loss_fn(model: GPT, params: Any, batch: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Mean next-token cross-entropy of a batch of windows (batch, context_length + 1)."""
    rngs = None if rng is None else {"dropout": rng}
    logits, _ = model.apply({"params": params}, batch[:, :-1], deterministic=rng is None, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(model: GPT, tx: optax.GradientTransformation, grad_accum_steps: int,
                    param_shardings: Any = None) -> Callable[[TrainState, jax.Array, jax.Array], tuple]:
    """A pure step (state, batch, rng) -> (state, metrics); the dropout key is fold_in(rng, step).

    The batch is (rows, tokens), or (micro-batches, rows, tokens) as training lays it out on a mesh (every
    micro-batch spread over every device). With grad_accum_steps > 1 the micro-batches' gradients are averaged
    inside the same compiled function (lax.scan), before one optimizer update; with `param_shardings` their sum
    is kept laid out as the parameters are (XLA would make it replicated).
    """
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(model, p, b, r))

    def train_step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state.step)
        micro = batch.reshape(grad_accum_steps, -1, batch.shape[-1])
        if grad_accum_steps == 1:
            loss, grads = grad_fn(state.params, micro[0], rng)
        else:

            def accumulate(carry, xs):
                i, b = xs
                loss, grads = grad_fn(state.params, b, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            if param_shardings is not None:
                zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
            zeros = (jnp.zeros(()), zeros)
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
            loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def jit_train_step(model: GPT, tx: optax.GradientTransformation, grad_accum_steps: int,
                   profile: bool = False, state_shardings: Any = None, batch_sharding: Any = None) -> Callable:
    """The train step as training runs it (and the bench times it): jitted whole, the state donated; on a mesh
    with the state's and the batch's shardings in and the state's out, so its second call runs its first's
    program. `profile=True` compiles it to record every XLA op in a profiler trace (`Backend.jit_options`)."""
    placed = {}
    if state_shardings is not None:
        replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
        placed = {"in_shardings": (state_shardings, batch_sharding, replicated),
                  "out_shardings": (state_shardings, replicated)}
    return jax.jit(make_train_step(model, tx, grad_accum_steps, None if state_shardings is None else
                                   state_shardings.params), donate_argnums=(0,), **placed,
                   **model.backend.jit_options(profile))


def jit_eval_step(model: GPT) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """(params, windows, targets) -> the summed cross-entropy of the first `targets[i]` targets of each window i,
    without dropout (`metrics.window_loss` divides by their count: every target weighs the same)."""

    def loss_sum(params: Any, windows: jax.Array, targets: jax.Array) -> jax.Array:
        logits, _ = model.apply({"params": params}, windows[:, :-1], deterministic=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
        return jnp.sum(jnp.where(jnp.arange(losses.shape[1]) < targets[:, None], losses, 0.0))

    return jax.jit(loss_sum, **model.backend.jit_options())
