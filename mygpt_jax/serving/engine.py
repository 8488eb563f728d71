"""The server's device side: a KV cache of `rows` rows, each at its own position, and the compiled programs that
fill a row from a prompt and decode one token for every row at once.

The model is called under `jax.vmap` over rows (the weights shared, each row with its own cache row and its own
scalar `cache_index`), so the same `GPT.__call__` that `sample` runs serves every row at its own position.

Shapes come from buckets (16, 32, 64, ... up to the context): a prompt is prefilled at its length's bucket, and
the cache holds the bucket of the longest end any live row may reach (its prompt plus its `max_tokens`), so
short requests decode over a short cache. Every program, for every bucket, is compiled by `compile()` before
the server answers: prefill per prompt bucket, the step per cache length, the insert per (prompt bucket,
cache length), and the resize between neighbouring cache lengths.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mygpt_jax.backends import Backend
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.model import KVCache, ModelConfig, init_cache
from mygpt_jax.serving.sampling import logprobs_of, sample_rows
from mygpt_jax.tokenizer import VOCAB_SIZE


class Rows(NamedTuple):
    """Every row's decoding state, on the device."""

    cache: list[KVCache]  # per layer, (rows, heads, cache length, head_dim)
    logits: jax.Array  # (rows, vocab): the prediction for the row's next token
    position: jax.Array  # (rows,) where the row's next token goes in the cache
    count: jax.Array  # (rows,) tokens the row has generated (the token index of its random key)
    keys: jax.Array  # (rows,) the row's request key (seed folded with the choice index)
    temperature: jax.Array  # (rows,) 0 = greedy
    top_k: jax.Array  # (rows,) 0 = off
    top_p: jax.Array  # (rows,) 1 = off


class Prefill(NamedTuple):
    """One prompt's prefill: its cache (per layer (1, heads, bucket, head_dim)), the logits after its last token,
    and each prompt token's log-probability given the ones before (index j is token j + 1's)."""

    cache: list[KVCache]
    logits: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


class Sampled(NamedTuple):
    """A step's output for every row (on the host after `Engine.step`)."""

    token: Any
    logprob: Any
    top_ids: Any
    top_logprobs: Any


class RowSettings(NamedTuple):
    """What a sequence sets in its row: its random key's seed and choice index, its sampling settings."""

    seed: int
    choice: int
    temperature: float
    top_k: int
    top_p: float


def buckets(context_length: int) -> list[int]:
    """The shapes prompts and the cache are rounded up to: powers of two from 16, and the context itself."""
    sizes, size = [], 16
    while size < context_length:
        sizes.append(size)
        size *= 2
    return [*sizes, context_length]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(size for size in sizes if size >= n)


class Engine:
    """The rows' state and the compiled programs that change it; used by one thread (the scheduler)."""

    def __init__(self, cfg: ModelConfig, params: Any, backend: Backend, rows: int):
        self.cfg, self.rows = cfg, rows
        self.vocab = min(cfg.vocab_size, VOCAB_SIZE)  # the real vocabulary: the tokenizer's ids
        # The Generator stores the weights as `sample` decodes with them (compute dtype, decoding layout).
        self._generator = Generator(cfg, params, SamplingSettings(), backend)
        self._jit_options = backend.jit_options()
        self.sizes = buckets(cfg.context_length)
        self.length = self.sizes[0]
        self.state: Rows | None = None
        self._programs: dict[tuple, Any] = {}

    def _apply(self, params: Any, tokens: jax.Array, cache: list[KVCache], index: jax.Array) -> tuple:
        return self._generator.apply(params, tokens, cache=cache, cache_index=index)

    def _prefill(self, params: Any, padded: jax.Array) -> Prefill:
        cache = init_cache(self.cfg, 1, length=padded.shape[1])
        logits, cache = self._apply(params, padded, cache, 0)
        logits = logits[0, :, :self.vocab]
        following = jnp.concatenate([padded[0, 1:], jnp.zeros((1,), jnp.int32)])
        return Prefill(cache, logits, *logprobs_of(logits, following))

    def _insert(self, state: Rows, prefill: Prefill, slot: jax.Array, length: jax.Array, seed: jax.Array,
                choice: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> Rows:
        cache = jax.tree.map(lambda big, row: jax.lax.dynamic_update_slice(
            big, row.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1)), state.cache, prefill.cache)
        key = jax.random.fold_in(jax.random.key(seed), choice)
        return Rows(cache, state.logits.at[slot].set(prefill.logits[length - 1]), state.position.at[slot].set(length),
                    state.count.at[slot].set(0), state.keys.at[slot].set(key),
                    state.temperature.at[slot].set(temperature), state.top_k.at[slot].set(top_k),
                    state.top_p.at[slot].set(top_p))

    def _step(self, params: Any, state: Rows, active: jax.Array) -> tuple[Rows, Sampled]:
        keys = jax.vmap(jax.random.fold_in)(state.keys, state.count)
        token = sample_rows(state.logits, keys, state.temperature, state.top_k, state.top_p)
        sampled = Sampled(token, *logprobs_of(state.logits, token))

        def one_row(token: jax.Array, cache: list[KVCache], index: jax.Array) -> tuple[jax.Array, list[KVCache]]:
            logits, cache = self._apply(params, token[None, None], jax.tree.map(lambda c: c[None], cache), index)
            return logits[0, -1, :self.vocab], jax.tree.map(lambda c: c[0], cache)

        logits, cache = jax.vmap(one_row)(token, state.cache, jnp.where(active, state.position, 0))
        step = active.astype(jnp.int32)
        return state._replace(cache=cache, logits=logits, position=state.position + step,
                              count=state.count + step), sampled

    def _empty(self, length: int) -> Rows:
        n = self.rows
        return Rows(init_cache(self.cfg, n, length=length), jnp.zeros((n, self.vocab), jnp.float32),
                    jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32),
                    jax.random.split(jax.random.key(0), n), jnp.zeros((n,), jnp.float32),
                    jnp.zeros((n,), jnp.int32), jnp.ones((n,), jnp.float32))

    @staticmethod
    def _resize(state: Rows, length: int) -> Rows:
        def fit(c: jax.Array) -> jax.Array:  # positions are the cache's third axis (model.KVCache)
            have = c.shape[2]
            return c[:, :, :length] if have >= length else jnp.pad(c, [(0, 0), (0, 0), (0, length - have), (0, 0)])

        return state._replace(cache=jax.tree.map(fit, state.cache))

    def compile(self) -> int:
        """Compile every program for every bucket (so that no request waits for a compile) and create the rows;
        returns how many programs there are."""
        params, sizes = self._generator.params, self.sizes
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        states = {n: jax.eval_shape(lambda n=n: self._empty(n)) for n in sizes}
        prompts = {n: jax.ShapeDtypeStruct((1, n), jnp.int32) for n in sizes}
        fills = {n: jax.eval_shape(self._prefill, params, prompts[n]) for n in sizes}
        active = jax.ShapeDtypeStruct((self.rows,), jnp.bool_)
        seed = jax.ShapeDtypeStruct((), jnp.uint32)
        settings = (scalar, jax.ShapeDtypeStruct((), jnp.float32), scalar, jax.ShapeDtypeStruct((), jnp.float32))
        jobs = {}
        for n in sizes:
            jobs["prefill", n] = (self._prefill, (), (params, prompts[n]))
            jobs["step", n] = (self._step, (1,), (params, states[n], active))
            for p in sizes[:sizes.index(n) + 1]:
                jobs["insert", p, n] = (self._insert, (0,), (states[n], fills[p], scalar, scalar, seed, *settings))
        for a, b in itertools.pairwise(sizes):
            for old, new in ((a, b), (b, a)):
                jobs["resize", old, new] = (lambda s, new=new: self._resize(s, new), (), (states[old],))
        for name, (fn, donate, args) in jobs.items():
            self._programs[name] = jax.jit(fn, donate_argnums=donate, **self._jit_options).lower(*args).compile()
        self.state = jax.jit(lambda: self._empty(self.length))()
        return len(jobs)

    def prefill(self, ids: list[int]) -> Prefill:
        """The prompt's cache and logits, computed on its own (the other rows wait for no more than this)."""
        size = bucket_for(len(ids), self.sizes)
        padded = np.zeros((1, size), np.int32)
        padded[0, :len(ids)] = ids
        return self._programs["prefill", size](self._generator.params, padded)

    def insert(self, slot: int, prefill: Prefill, length: int, row: RowSettings) -> None:
        """Put a prefilled prompt of `length` tokens into row `slot` (the cache long enough: `fit_length`)."""
        program = self._programs["insert", prefill.cache[0].k.shape[2], self.length]
        self.state = program(self.state, prefill, np.int32(slot), np.int32(length), np.uint32(row.seed % 2 ** 32),
                             np.int32(row.choice), np.float32(row.temperature), np.int32(row.top_k),
                             np.float32(row.top_p))

    def fit_length(self, longest_end: int) -> None:
        """Grow or shrink the cache to the bucket of `longest_end`, the furthest position a live row may reach."""
        target = bucket_for(longest_end, self.sizes)
        while self.length != target:
            i = self.sizes.index(self.length)
            new = self.sizes[i + 1] if target > self.length else self.sizes[i - 1]
            self.state = self._programs["resize", self.length, new](self.state)
            self.length = new

    def step(self, active: np.ndarray) -> Sampled:
        """One token for every row (rows where `active` is False compute and are ignored), fetched to the host."""
        self.state, sampled = self._programs["step", self.length](self._generator.params, self.state, active)
        return Sampled(*jax.device_get(tuple(sampled)))


def compile_all(engine: Engine) -> str:
    """Compile the engine's programs; a line saying how many and how long it took."""
    start = time.time()
    count = engine.compile()
    return f"compiled {count} programs for {engine.rows} rows in {time.time() - start:.1f} s"
