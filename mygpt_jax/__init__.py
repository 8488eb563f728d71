"""mygpt_jax: GPT-2 from scratch in JAX/Flax."""

import time

__version__ = "0.1.0"
STARTED = time.time()  # when the command started (its first import): start-up times count from here
