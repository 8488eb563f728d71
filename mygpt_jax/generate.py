"""Text generation with a KV cache: one prefill pass over the prompt, then one jitted step per token.

`Generator.generate` runs the whole decode loop on the device (`lax.while_loop`, `decode_loop="device"`) or
calls one jitted step per token from Python (`"host"`, for backends whose while_loop is not to be trusted:
Metal); `Generator.stream` calls that step and yields each token as it is made (for the chat). Shapes never
depend on the prompt length (prompts, and the KV cache's length, padded prompt plus new tokens, are
rounded up to powers of two) or on the step, so nothing is recompiled per token or per prompt of a
similar length.

Decoding one sequence is bound by memory bandwidth: every token reads all the weights once. The weights
are kept in the model's compute dtype, so a bfloat16 model (`--config.model.dtype=bfloat16`) streams half
the bytes of a float32 one, with the same logits as casting them at every step, and in the backend's decoding
layout (`Backend.decode_layout`: on XLA:CPU dense kernels transposed, the layout its matrix-vector product reads
fastest).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mygpt_jax import sharding
from mygpt_jax.backends import Backend
from mygpt_jax.errors import UserError
from mygpt_jax.model import GPT, KVCache, ModelConfig, init_cache
from mygpt_jax.tokenizer import END_OF_TEXT_ID


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 50
    num_samples: int = 1
    stop_token: int | None = END_OF_TEXT_ID
    decode_loop: str = "device"  # "device": lax.while_loop; "host": a jitted step per token, called from Python

    def __post_init__(self) -> None:
        if self.decode_loop not in ("device", "host"):
            raise ValueError(f"decode_loop {self.decode_loop!r}: resolve the config first (backends.resolve)")

    @classmethod
    def from_config(cls, sample: ml_collections.ConfigDict) -> SamplingSettings:
        return cls(temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p,
                   max_new_tokens=sample.max_new_tokens, num_samples=sample.num_samples,
                   decode_loop=sample.decode_loop)


def sample_logits(logits: jax.Array, rng: jax.Array, s: SamplingSettings) -> jax.Array:
    """Next token ids (batch,) from logits (batch, vocab): greedy, or temperature + top-k + top-p."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cumulative < s.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


class DecodeState(NamedTuple):
    cache: list[KVCache]
    logits: jax.Array  # (batch, vocab): the model's prediction for the next position
    position: jax.Array  # where the next token goes in the cache
    rng: jax.Array
    tokens: jax.Array  # (batch, max_new_tokens) generated so far
    count: jax.Array  # how many tokens have been generated
    done: jax.Array  # (batch,) bool: this sample has produced the stop token


def fit_prompt(ids: list[int], context_length: int, max_new_tokens: int) -> tuple[list[int], int, list[str]]:
    """(prompt, new tokens, notes) that fit the context: the whole prompt with max_new_tokens capped to the room it
    leaves; only a prompt that fills the context itself is cut, to its last tokens. At most one note says what
    changed."""
    if not ids:
        raise UserError("the prompt is empty; give some text to complete")
    if len(ids) < context_length:
        new = min(max_new_tokens, context_length - len(ids))
        note = (f"max_new_tokens={max_new_tokens} is capped at {new}: the prompt's {len(ids)} tokens leave room for "
                f"{new} new ones in the context of {context_length}")
        return ids, new, [note] if new < max_new_tokens else []
    new = min(max_new_tokens, context_length - 1)
    room = context_length - new
    return ids[-room:], new, [f"the prompt has {len(ids)} tokens, the context {context_length}; kept its last {room} "
                              f"so that {new} new tokens fit"]


def _to_host(x: jax.Array) -> np.ndarray:
    """A decoding output as NumPy on every process, also where it lies on several processes' devices."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def _bucket(n: int, context_length: int) -> int:
    return min(context_length, max(16, 1 << (n - 1).bit_length()))


class Generator:
    """Completes token prompts with a trained model (parameters stay on the device between calls), computing as
    the `backend` profile says."""

    def __init__(self, cfg: ModelConfig, params: Any, settings: SamplingSettings, backend: Backend):
        self.cfg, self.settings, self.backend, self.layout = cfg, settings, backend, backend.decode_layout
        self.params = params
        self.model = GPT(cfg, backend.for_decoding())
        options = backend.jit_options()
        self._prefill = jax.jit(self._prefill_impl, static_argnums=(3, 4), **options)
        self._step = jax.jit(self._step_impl, donate_argnums=(1,), **options)
        self._loop = jax.jit(self._loop_impl, donate_argnums=(1,), **options)

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        """Store the weights once as decoding reads them fastest: in the compute dtype (instead of casting them
        at every token), in the backend's decoding layout (read back by `apply`)."""
        if params is not None:
            params = self.layout.store(jax.tree_util.tree_map(lambda p: p.astype(self.cfg.compute_dtype), params))
        self._params = params

    def apply(self, params: Any, tokens: jax.Array, **kwargs: Any) -> tuple[jax.Array, Any]:
        """The model on stored weights (`params`): inside a jitted step, where the layout's `load` costs nothing."""
        return self.model.apply({"params": self.layout.load(params)}, tokens, **kwargs)

    def _prefill_impl(self, params: Any, padded: jax.Array, length: jax.Array, max_new: int, cache_length: int,
                      rng: jax.Array) -> DecodeState:
        batch = padded.shape[0]
        cache = init_cache(self.cfg, batch, length=cache_length)
        logits, cache = self.apply(params, padded, cache=cache, cache_index=0)
        return DecodeState(cache, logits[jnp.arange(batch), length - 1], length, rng,
                           jnp.zeros((batch, max_new), jnp.int32), jnp.int32(0), jnp.zeros((batch,), bool))

    def _step_impl(self, params: Any, state: DecodeState) -> DecodeState:
        rng, key = jax.random.split(state.rng)
        token = sample_logits(state.logits, key, self.settings)
        stop = self.settings.stop_token
        if stop is not None:
            token = jnp.where(state.done, stop, token)
        logits, cache = self.apply(params, token[:, None], cache=state.cache, cache_index=state.position)
        done = state.done | (token == stop) if stop is not None else state.done
        return DecodeState(cache, logits[:, -1], state.position + 1, rng,
                           state.tokens.at[:, state.count].set(token), state.count + 1, done)

    def _loop_impl(self, params: Any, state: DecodeState) -> DecodeState:
        def running(s: DecodeState) -> jax.Array:
            return (s.count < s.tokens.shape[1]) & ~jnp.all(s.done)

        return jax.lax.while_loop(running, lambda s: self._step_impl(params, s), state)

    def prepare(self, prompt: list[int]) -> tuple[list[int], int, list[str]]:
        """(prompt cropped to fit, max_new_tokens capped to fit, notes saying what was changed)."""
        return fit_prompt(prompt, self.cfg.context_length, self.settings.max_new_tokens)

    def _start(self, prompt: list[int], rng: jax.Array) -> tuple[DecodeState, list[str]]:
        prompt, max_new, notes = self.prepare(prompt)
        padded = np.zeros((self.settings.num_samples, _bucket(len(prompt), self.cfg.context_length)), np.int32)
        padded[:, :len(prompt)] = prompt
        # The cache holds the padded prompt and the new tokens, rounded up to a power of two, not the whole
        # context: every decoding step's attention reads all of it, used or not, so a cache of the whole context
        # for a short text slows every step (measured: docs/performance.md). It changes length only where the
        # prompt's bucket does, so a chat recompiles the decoding step only when it recompiles the prefill.
        cache_length = _bucket(padded.shape[1] + max_new, self.cfg.context_length)
        return self._prefill(self.params, self._replicated(padded), self._replicated(np.int32(len(prompt))), max_new,
                             cache_length, self._replicated(rng)), notes

    def _replicated(self, x: Any) -> jax.Array:
        """An input of the decoding steps: on this process's device, or, when the weights span several processes'
        devices (a run on many hosts), the same value on every device of their mesh."""
        leaf = jax.tree_util.tree_leaves(self.params)[0]
        if leaf.is_fully_addressable:
            return jnp.asarray(x)
        return sharding.put(x, jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec()))

    def _trim(self, tokens: np.ndarray) -> list[list[int]]:
        stop = self.settings.stop_token
        rows = [[int(t) for t in row] for row in tokens]
        return [row[:row.index(stop)] if stop in row else row for row in rows]

    def generate(self, prompt: list[int], rng: jax.Array) -> tuple[list[list[int]], list[str]]:
        """New tokens of each sample (stop token excluded) and notes on cropping, decoded by the settings'
        decode_loop."""
        state, notes = self._start(prompt, rng)
        if self.settings.decode_loop == "device":
            state = self._loop(self.params, state)
        else:
            state = functools.reduce(lambda _, after: after, self._steps(state), state)  # the last step's state
        return self._trim(_to_host(state.tokens)[:, :int(state.count)]), notes

    def stream(self, prompt: list[int], rng: jax.Array) -> Iterator[np.ndarray]:
        """Yield the next token of every sample, (num_samples,), until all stop or max_new_tokens."""
        state, _ = self._start(prompt, rng)
        for step in self._steps(state):
            yield _to_host(step.tokens)[:, int(step.count) - 1]

    def _steps(self, state: DecodeState) -> Iterator[DecodeState]:
        """The state after each jitted step called from Python, until every sample stops or max_new_tokens."""
        for _ in range(state.tokens.shape[1]):
            state = self._step(self.params, state)
            yield state
            if bool(np.all(_to_host(state.done))):
                return
