"""Sampling for the server's batched step: every row with its own temperature, top-k, top-p and random key, all
arrays of one compiled program (`generate.sample_logits` bakes one setting into its program instead)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's legacy `logprobs` limit)


def _filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits (rows, vocab) with what each row's top-k (0 = off) and then top-p (1 = off) leave out set to -inf."""
    vocab = logits.shape[-1]
    ranked = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    kth = jnp.take_along_axis(ranked, k - 1, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
    # top-p: the smallest set of the most likely tokens whose probability reaches top_p
    cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    cutoff_index = jnp.minimum(jnp.sum(cumulative < top_p[:, None], axis=-1, keepdims=True), vocab - 1)
    cutoff = jnp.take_along_axis(ranked, cutoff_index, axis=-1)
    return jnp.where((top_p[:, None] < 1.0) & (logits < cutoff), -jnp.inf, logits)


def _draw(logits: jax.Array, keys: jax.Array) -> jax.Array:
    """A token per row from softmax(logits), by the inverse of its cumulative distribution at one uniform number
    per row (a Gumbel draw, as `jax.random.categorical` makes, costs a random number per vocabulary entry)."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    return jnp.sum(cdf < u[:, None], axis=-1)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Next token ids (rows,) from logits (rows, vocab): greedy where a row's temperature is 0, else drawn with
    that row's key after temperature, top-k and top-p. The sort that top-k and top-p need runs only in steps
    where some row uses them, the draw only where some row samples."""
    greedy = jnp.argmax(logits, axis=-1)
    sampling = temperature > 0
    scaled = logits / jnp.where(sampling, temperature, 1.0)[:, None]
    filtering = jnp.any(sampling & ((top_k > 0) | (top_p < 1.0)))
    scaled = jax.lax.cond(filtering, _filter, lambda x, *_: x, scaled, top_k, top_p)
    drawn = jax.lax.cond(jnp.any(sampling), _draw, lambda x, _: jnp.zeros(x.shape[:1], jnp.int32), scaled, keys)
    return jnp.where(sampling, drawn, greedy).astype(jnp.int32)


def logprobs_of(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The raw log-softmax of logits (..., vocab), before any sampling setting: (log-probability of `tokens`
    (...), the TOP_LOGPROBS most likely ids (..., k) and their log-probabilities (..., k))."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return chosen, top_ids.astype(jnp.int32), top_lp
