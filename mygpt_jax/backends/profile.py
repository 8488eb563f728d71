"""The shape of a backend profile: what the model, the trainer and the generator take from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax


def dense_dimensions(ndim: int) -> tuple:
    """What nn.Dense asks its dot_general for: x (..., in) contracted on `in` with a kernel (in, features)."""
    return ((ndim - 1,), (0,)), ((), ())


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """How the Generator keeps the weights for decoding: `store(params)` once, `load(stored)` inside every jitted
    decoding step (giving the model the params as trained), and the dense product (`dot_general`) that reads what
    `load` gave. `store` also maps the params' logical axis names (`model.logical_axes`) to the stored tree's."""

    name: str
    store: Callable[[Any], Any]
    load: Callable[[Any], Any]
    dot_general: Callable[..., jax.Array]


AS_TRAINED = DecodeLayout("as trained", store=lambda tree: tree, load=lambda tree: tree,
                          dot_general=jax.lax.dot_general)


def no_compiler_options(profile: bool = False) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one kind of device gets: chosen once per process (`backends.current()`) and handed to the model (a
    field of `model.GPT`), the trainer and the generator. The first three fields are what the config's "auto"
    values become (`backends.resolve`); the others are how the model computes."""

    platform: str  # the profile's name: jax's platform, with "gpu" told apart as "cuda" or "rocm"
    dtype: str  # model.dtype="auto": the compute dtype
    attention: str  # model.attention="auto" where the config allows a fused one (drop_rate 0); else "explicit"
    decode_loop: str  # sample.decode_loop="auto": "device" (lax.while_loop) or "host" (a jitted step per token)
    dropout: type[nn.Module] = nn.Dropout  # called as dropout(rate)(x, deterministic), named "Dropout_<i>"
    dot_general: Callable[..., jax.Array] = jax.lax.dot_general  # dense layers' product, as nn.Dense takes it
    decode_layout: DecodeLayout = AS_TRAINED
    compiler_options: Callable[[bool], dict[str, Any]] = no_compiler_options  # (profile) -> XLA options
    probe_dtype: bool = False  # try a 16-bit compute dtype with a tiny product before using it

    def jit_options(self, profile: bool = False) -> dict[str, Any]:
        """Extra `jax.jit` arguments for the model's steps: `jax.jit(step, **backend.jit_options())`;
        `profile=True` where the step is compiled to record its ops in a profiler trace."""
        options = self.compiler_options(profile)
        return {"compiler_options": options} if options else {}

    def for_decoding(self) -> Backend:
        """The profile the Generator's model runs with: dense products that read `decode_layout.load`'s params."""
        return dataclasses.replace(self, dot_general=self.decode_layout.dot_general)


# The stock Flax layers in float32: what a platform without a profile gets, and what initialisation traces
# (parameters do not depend on the profile).
STOCK = Backend("stock", dtype="float32", attention="explicit", decode_loop="device")
