"""What this machine can do, and the shims for JAX versions: the compilation cache, reading profiles back.

`matmul_rate` and `read_bandwidth` measure the limits that training (FLOP/s) and decoding (bytes/s) are
compared with; `flops_reference` gives training its yardstick (a GPU's bf16 peak, else the measured matmul
rate of the compute dtype). What differs between backends lives in mygpt_jax/backends/.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from mygpt_jax.backends import Backend

# Dense bfloat16 tensor-core peaks (FLOP/s, SXM parts) for MFU; a CPU's reference is its measured matmul rate.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def use_compilation_cache(directory: str, min_seconds: float) -> None:
    """Keep compiled XLA programs in `directory` (jax's persistent compilation cache; "" leaves it off), those
    that took at least `min_seconds` to compile: a command run again loads them instead of compiling, so its
    first step or first text comes sooner (measured: docs/performance.md). A folder that cannot be written gets
    one warning line and no cache (jax would print Python warnings with source lines when it fails to read or
    write it)."""
    if not directory:
        return
    directory = os.path.expanduser(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        print(f"warning: cannot write the compilation cache folder {directory} ({e.strerror or e}); running without "
              "it; set --config.compilation_cache_dir to a writable folder or \"\" to turn it off", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    # jax writes an entry in place, so a command reading while another writes the same one (two processes of one
    # run, two commands at once) may find it cut short: jax then compiles the program itself, which is all that
    # is needed, but first warns with its source line.
    warnings.filterwarnings("ignore", message="Error (reading|writing) persistent compilation cache entry")


def can_read_profiles() -> bool:
    """Whether this jax reads a profiler trace back in Python (jax.profiler.ProfileData: not in jax 0.5.0 and
    older; None in jax 0.6.2, whose jaxlib lacks it)."""
    return getattr(jax.profiler, "ProfileData", None) is not None


def _best_seconds(fn: Any, *args: Any, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)  # a limit: other jobs on the machine only ever slow a run down


def matmul_rate(n: int, dtype: str, backend: Backend, repeats: int = 5) -> float:
    """FLOP/s of jnp.dot on two random n x n matrices of this dtype (the best of `repeats`), compiled as the
    backend compiles the model's steps."""
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), dtype)
    return 2 * n ** 3 / _best_seconds(jax.jit(jnp.dot, **backend.jit_options()), a, b, repeats=repeats)


def read_bandwidth(megabytes: int, repeats: int = 5) -> float:
    """Bytes read per second by a sum over a float32 array: what streaming the weights can reach."""
    x = jnp.ones(megabytes * 2 ** 20 // 4, jnp.float32)
    return x.nbytes / _best_seconds(jax.jit(jnp.sum), x, repeats=repeats)


def copy_bandwidth(megabytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by y = x + 1 on a float32 array, in place (the best of `repeats`).

    The buffer is donated: a fresh output of this size would time the kernel's page faults, not memory.
    """
    add_one = jax.jit(lambda x: x + 1, donate_argnums=0)
    x = add_one(jnp.zeros(megabytes * 2 ** 20 // 4, jnp.float32))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = add_one(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / min(times)


def gpu_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((f for name, f in GPU_PEAK_FLOPS.items() if name in kind), None)


def flops_reference(dtype: str, matmul_size: int, backend: Backend) -> tuple[float, str]:
    """(FLOP/s, what it is) that training's achieved FLOP/s is a fraction of."""
    peak = gpu_peak_flops()
    if peak is not None:
        return peak, f"the {jax.devices()[0].device_kind}'s bf16 peak"
    dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    return matmul_rate(matmul_size, dtype, backend), f"the measured {dtype} matmul rate"
