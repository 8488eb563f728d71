"""The suite computes on the CPU, in its own processes and in every command it starts (they inherit the
environment), whatever accelerator the machine has: its pinned losses, dtypes and device names are the CPU's, and
the GPU's figures come from the bench (experiments/gpu_bench.sh). Set here, the package's first import, before any
test or fixture imports JAX."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
