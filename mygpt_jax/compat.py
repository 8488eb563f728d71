"""Where JAX, Flax, Orbax and optax releases differ: every version shim of the package lives here, each with the
versions it covers, so that dropping an old release is one file's change.

The code runs on jax 0.10.x (Python 3.11), 0.6.2 (Python 3.10) and 0.5.0 (jax-metal's only working JAX); the
pinned versions of each line are in constraints.txt and constraints-jax050.txt.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax


def _muon_applies_shape_factor() -> bool:
    """optax 0.2.5's `scale_by_muon` multiplies each update by sqrt(max(1, fan_out / fan_in)) itself; 0.2.8's (which
    takes `weight_dimension_numbers`, the refactor that moved the factor out to `muon()`'s own chain) does not."""
    return "weight_dimension_numbers" not in inspect.signature(optax.contrib.scale_by_muon).parameters


def scale_by_muon(**kwargs) -> optax.GradientTransformation:
    """`optax.contrib.scale_by_muon(**kwargs)` with the shape factor sqrt(max(1, fan_out / fan_in)) of a (fan_in,
    fan_out) kernel on every optax line: inside it on 0.2.5, applied after it here on 0.2.8, where it also needs the
    leaves' dimension numbers."""
    if _muon_applies_shape_factor():
        return optax.contrib.scale_by_muon(**kwargs)
    # 0.2.8 reads every leaf as a (fan_in, fan_out) matrix only when told so for each leaf.
    matrices = optax.contrib.MuonDimensionNumbers()
    muon = optax.contrib.scale_by_muon(**kwargs, weight_dimension_numbers=lambda tree: jax.tree.map(
        lambda _: matrices, tree))
    factor = optax.stateless(lambda updates, params: jax.tree.map(
        lambda u: u * jnp.sqrt(jnp.maximum(1.0, u.shape[-1] / u.shape[-2])), updates))
    return optax.chain(muon, factor)
