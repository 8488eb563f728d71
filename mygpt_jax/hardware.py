"""What this backend can do and how to compile for it: the one place for XLA/backend shims.

`jit_options()` holds the extra `jax.jit` arguments every jitted step of the project uses;
`matmul_rate` and `read_bandwidth` measure the limits that training (FLOP/s) and decoding (bytes/s)
are compared with; `flops_reference` gives training its yardstick (a GPU's bf16 peak, else the measured
matmul rate of the compute dtype).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense bfloat16 tensor-core peaks (FLOP/s, SXM parts) for MFU; a CPU's reference is its measured matmul rate.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@functools.cache
def jit_options(profile: bool = False) -> dict[str, Any]:
    """Extra `jax.jit` arguments for the model's steps on this backend: `jax.jit(step, **jit_options())`.

    For XLA:CPU builds with YNNPACK (measured with jax 0.10.2, bench table in the README):
    - YNNPACK gets matmuls one by one, not reductions: a YNNPACK reduction running beside other work (a
      gradient norm the step once computed, beside the backward pass) spin-waits for the shared thread
      pool. With this setting jnp.dot runs at 1.7x the rate of the default and the seed-config train step
      is 1.3x faster.
      (Matmuls fused with their neighbours made bfloat16 4x slower.)
    - copy insertion uses region analysis: without it XLA copies every layer's KV cache at every
      decoding step instead of updating it in place.
    `profile=True` also makes XLA:CPU record every op in a jax.profiler trace (`profiling.op_seconds`; GPUs
    always do), where this XLA can. Other backends, and jax/XLA versions without these options (jax-metal's
    0.4.x), get nothing.
    """
    if jax.default_backend() != "cpu":
        return {}
    options = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
               "xla_cpu_copy_insertion_use_region_analysis": True}
    if not _compiles_with(options):
        return {}
    if profile and _compiles_with({**options, "xla_cpu_enable_xprof_traceme": True}):
        options["xla_cpu_enable_xprof_traceme"] = True
    return {"compiler_options": options}


def _compiles_with(compiler_options: dict[str, Any]) -> bool:
    try:
        jax.jit(jnp.sum, compiler_options=compiler_options).lower(jnp.zeros(2)).compile()
    except (TypeError, RuntimeError, ValueError):  # a jax.jit without compiler_options, or an XLA without these
        return False
    return True


def plain_weight_gradients() -> bool:
    """Whether dense layers should compute weight gradients as plain row-major matmuls (`model.matmul`).

    XLA:CPU runs autodiff's x^T @ dy (both operands contracted on their first axis) in Eigen rather than
    YNNPACK; materialising x^T first made the seed-config step 1.10x faster. GPU libraries take transposed
    operands as they are, where the extra copy would only cost.
    """
    return jax.default_backend() == "cpu"


def has_cudnn_attention() -> bool:
    """Whether jax.nn.dot_product_attention(implementation="cudnn") can run: JAX on an NVIDIA (CUDA) GPU of
    compute capability 8.0 (Ampere) or later, which cuDNN's fused attention needs."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
        return False
    return float(getattr(device, "compute_capability", "0")) >= 8.0


def use_compilation_cache(directory: str, min_seconds: float) -> None:
    """Keep compiled XLA programs in `directory` (jax's persistent compilation cache; "" leaves it off), those
    that took at least `min_seconds` to compile: a command run again loads them instead of compiling (the
    124M decoding's first text 9.0 -> 6.0 s, README). A folder that cannot be written gets one warning line and
    no cache (jax would print Python warnings with source lines when it fails to read or write it)."""
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


def can_read_profiles() -> bool:
    """Whether this jax reads a profiler trace back in Python (jax.profiler.ProfileData: not in jax 0.5.0 and
    older)."""
    return hasattr(jax.profiler, "ProfileData")


def _best_seconds(fn: Any, *args: Any, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)  # a limit: other jobs on the machine only ever slow a run down


def matmul_rate(n: int, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of jnp.dot on two random n x n matrices of this dtype (the best of `repeats`)."""
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), dtype)
    return 2 * n ** 3 / _best_seconds(jax.jit(jnp.dot, **jit_options()), a, b, repeats=repeats)


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


def flops_reference(dtype: str, matmul_size: int) -> tuple[float, str]:
    """(FLOP/s, what it is) that training's achieved FLOP/s is a fraction of."""
    peak = gpu_peak_flops()
    if peak is not None:
        return peak, f"the {jax.devices()[0].device_kind}'s bf16 peak"
    dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    return matmul_rate(matmul_size, dtype), f"the measured {dtype} matmul rate"


def device_name() -> str:
    d = jax.devices()[0]
    return f"cpu ({os.cpu_count()} cores)" if d.platform == "cpu" else f"{d.platform} ({d.device_kind})"
