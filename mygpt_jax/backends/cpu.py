"""What XLA:CPU gets that other backends do not: the kernels of the `cpu` profile (mygpt_jax/backends/__init__.py).

Each one is a speed-up measured with `python -m mygpt_jax.bench` (the figures: docs/backends.md):
- `dot_general`: dense layers take their weight gradients as plain row-major matmuls (`matmul`), which
  YNNPACK runs, instead of autodiff's product contracting both operands' first axis, which Eigen runs.
- `Dropout`: masks from a counter hash instead of a threefry number per element.
- `TRANSPOSED`: the Generator keeps dense kernels transposed, the layout XLA:CPU's matrix-vector products
  read fastest.
- `compiler_options`: XLA settings for YNNPACK and in-place KV-cache updates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mygpt_jax.backends.profile import DecodeLayout, dense_dimensions


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w, x (..., k) by w (k, n), as a dense layer computes it; only the backward pass differs.

    Autodiff computes the weight gradient x^T @ dy as a product contracting the first axis of both operands,
    which XLA:CPU hands to Eigen rather than YNNPACK: slower, and a third of a training step's matmul FLOPs.
    Here x^T is materialised first (an optimization_barrier stops XLA folding the transpose back into the
    product), so all three products are plain row-major matmuls. Values and gradients are autodiff's
    (tests/test_backends.py).
    """
    return x @ w


def _matmul_forward(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ w, (x, w)


def _matmul_backward(saved: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = saved
    dtype = jnp.result_type(x, w)  # what the forward product computed in
    rows_x, rows_dy = x.reshape(-1, x.shape[-1]).astype(dtype), dy.reshape(-1, dy.shape[-1]).astype(dtype)
    dw = jax.lax.optimization_barrier(rows_x.T) @ rows_dy
    dx = dy.astype(dtype) @ w.T.astype(dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)


def _dense_product(product: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable[..., jax.Array]:
    """`product(x, kernel)` with lax.dot_general's signature, for nn.Dense(dot_general=...) and the tied head."""

    def dot_general(x: jax.Array, kernel: jax.Array, dimension_numbers: Any, precision: Any = None,
                    preferred_element_type: Any = None) -> jax.Array:
        if dimension_numbers != dense_dimensions(x.ndim) or precision is not None or preferred_element_type:
            raise ValueError(f"a dense layer's product, not dot_general{dimension_numbers}")
        return product(x, kernel)

    return dot_general


dot_general = _dense_product(matmul)


def _kernels_transposed(tree: Any, transpose: Callable[[Any], Any], old: str, new: str) -> Any:
    """The tree with every dense kernel under `old` moved to `new`, `transpose`d."""
    if not isinstance(tree, Mapping):
        return tree
    return {new if name == old else name: transpose(nn.meta.unbox(value)) if name == old
            else _kernels_transposed(value, transpose, old, new) for name, value in tree.items()}


def _transpose(value: Any) -> Any:
    """An array transposed, or a kernel's logical axis names (a PartitionSpec) reversed."""
    return value.T if hasattr(value, "T") else type(value)(*reversed(tuple(value)))


def _reading_the_stored_kernel(x: jax.Array, kernel: jax.Array) -> jax.Array:
    # `kernel` is kernel_t.T (`TRANSPOSED.load`); contracting kernel.T's last axis, XLA cancels the two
    # transposes and the product reads kernel_t as it lies in memory.
    return jnp.einsum("...k,nk->...n", x, kernel.T)


TRANSPOSED = DecodeLayout(
    name="kernels transposed",
    # Dense kernels (in, features) stored as "kernel_t" (features, in): XLA:CPU's matrix-vector products, all
    # of decoding's work, stream that layout faster than (in, features).
    store=lambda tree: _kernels_transposed(tree, _transpose, "kernel", "kernel_t"),
    load=lambda tree: _kernels_transposed(tree, _transpose, "kernel_t", "kernel"),
    dot_general=_dense_product(_reading_the_stored_kernel),
)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection that mixes every input bit into every output bit."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


class Dropout(nn.Module):  # named as nn.Dropout: a module's name picks its share of the "dropout" key
    """nn.Dropout's semantics (zero with probability `rate`, scale the rest by 1 / (1 - rate)), cheaper bits.

    jax.random draws one threefry number per element, slow on XLA:CPU, where a training step drops out tens of
    millions of elements. Here the bits of element i are a counter hash, fmix32(fmix32(i ^ s0) + s1), with
    (s0, s1) drawn from the usual "dropout" key: an elementwise integer fusion, just as reproducible, and plenty
    random for a mask.
    """

    rate: float
    counter_limit: int = 2 ** 32  # more elements than a uint32 counts: the leading index joins the hash

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        s0, s1 = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        if x.size < self.counter_limit:
            bits = _fmix32(_fmix32(jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) ^ s0) + s1)
        else:  # element (i, j) of x as (shape[0], -1): the pairs are distinct where the flat counter would wrap
            rows = x.shape[0]
            i = jax.lax.broadcasted_iota(jnp.uint32, (rows, x.size // rows), 0)
            j = jax.lax.broadcasted_iota(jnp.uint32, (rows, x.size // rows), 1)
            bits = _fmix32(_fmix32(j ^ s0) + (s1 ^ _fmix32(i + s0))).reshape(x.shape)
        keep = bits >= jnp.uint32(min(round(self.rate * 2.0 ** 32), 2 ** 32 - 1))
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


@functools.cache
def compiler_options(profile: bool = False) -> dict[str, Any]:
    """XLA:CPU settings for the model's jitted steps (each measured with the bench: docs/backends.md):

    - YNNPACK gets matmuls one by one, not reductions: a YNNPACK reduction running beside other work (a
      gradient norm the step once computed, beside the backward pass) spin-waits for the shared thread pool.
      (Matmuls fused with their neighbours made bfloat16 slower, not faster.)
    - copy insertion uses region analysis: without it XLA copies every layer's KV cache at every decoding
      step instead of updating it in place.
    `profile=True` also makes XLA:CPU record every op in a jax.profiler trace (`profiling.op_seconds`) where
    this XLA can. An XLA without these options (jax 0.5.0's) gets none.
    """
    options = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
               "xla_cpu_copy_insertion_use_region_analysis": True}
    if not _compiles_with(options):
        return {}
    if profile and _compiles_with({**options, "xla_cpu_enable_xprof_traceme": True}):
        options["xla_cpu_enable_xprof_traceme"] = True
    return options


def _compiles_with(options: dict[str, Any]) -> bool:
    try:
        jax.jit(jnp.sum, compiler_options=options).lower(jnp.zeros(2)).compile()
    except (TypeError, RuntimeError, ValueError):  # a jax.jit without compiler_options, or an XLA without these
        return False
    return True
