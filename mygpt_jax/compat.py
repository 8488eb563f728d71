"""Where JAX, Flax, Orbax and optax releases differ: every version shim of the package lives here, each with the
versions it covers, so that dropping an old release is one file's change.

The code runs on jax 0.10.x (Python 3.11), 0.6.2 (Python 3.10) and 0.5.0 (jax-metal's only working JAX); the
pinned versions of each line are in constraints.txt and constraints-jax050.txt.
"""

from __future__ import annotations
