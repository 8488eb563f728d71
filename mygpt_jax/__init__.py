"""mygpt_jax: GPT-2 from scratch in JAX/Flax."""

__version__ = "0.1.0"
