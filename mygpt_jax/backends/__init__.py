"""Everything that differs between backends, in one place: a profile per platform (docs/backends.md).

`current()` picks this process's profile once, from the device JAX runs on; the commands hand it to the model
(`GPT(cfg, backend)`), the trainer and the generator, which never look the platform up themselves.
`resolve(config, backend)` turns the config's "auto" values (model.dtype, model.attention,
sample.decode_loop) into the profile's choices at start-up, so a checkpoint records what a run used, and
`describe()` is the line every command prints first on stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mygpt_jax.backends import cpu
from mygpt_jax.backends.profile import AS_TRAINED, STOCK, Backend, DecodeLayout
from mygpt_jax.errors import UserError

__all__ = ["AS_TRAINED", "PROFILES", "STOCK", "Backend", "DecodeLayout", "current", "describe", "for_platform",
           "resolve"]

# The XLA:CPU kernels (backends/cpu.py) on CPUs; the stock layers everywhere else. bfloat16 where the chips
# compute in it natively; cuDNN's fused attention on NVIDIA GPUs; jax-metal (Apple GPUs): float32, and a
# decoding loop driven from Python, as its while_loop has crashed (jax issues 21552, 20750).
PROFILES = {profile.platform: profile for profile in (
    Backend("cpu", dtype="float32", attention="explicit", decode_loop="device", dropout=cpu.Dropout,
            dot_general=cpu.dot_general, decode_layout=cpu.TRANSPOSED, compiler_options=cpu.compiler_options),
    Backend("cuda", dtype="bfloat16", attention="cudnn", decode_loop="device"),
    Backend("rocm", dtype="bfloat16", attention="explicit", decode_loop="device"),
    Backend("tpu", dtype="bfloat16", attention="explicit", decode_loop="device"),
    Backend("METAL", dtype="float32", attention="explicit", decode_loop="host", probe_dtype=True),
)}


def for_platform(name: str) -> Backend:
    """The profile of a platform: "cpu", "cuda", "rocm", "tpu" or "METAL" (jax-metal's name); any other platform
    (a new PJRT plugin) gets the stock layers in float32."""
    return PROFILES.get(name) or dataclasses.replace(STOCK, platform=name)


def platform_of(device: jax.Device) -> str:
    """jax's platform name of a device, with its "gpu" told apart as "cuda" or "rocm"."""
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


@functools.cache
def current() -> Backend:
    """This process's profile, from the device JAX computes on (JAX_PLATFORMS=cpu makes it the CPU's). A backend
    that cannot start, or cannot take an array (jax-metal under a jax newer than 0.5.0), is a UserError."""
    try:
        device = jax.local_devices()[0]  # this process's: jax.devices()[0] is process 0's
        jax.device_put(np.zeros(1, np.float32), device).block_until_ready()
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"jax {jax.__version__} cannot compute on this machine's backend ({reason}); run with "
                        "JAX_PLATFORMS=cpu to use the CPU; Apple GPUs need jax 0.5.0: install with .ci/metal "
                        "(docs/backends.md)") from None
    return for_platform(platform_of(device))


def describe() -> str:
    """The backend and its devices in one line: `cpu (2 cores)`, `gpu: 8 x NVIDIA H100`, `METAL: Apple M2`; with
    several processes, which one this is (`gpu: 16 x NVIDIA H100, process 1 of 2`)."""
    devices = jax.devices()
    device = devices[0]
    processes = f", process {jax.process_index()} of {jax.process_count()}" if jax.process_count() > 1 else ""
    if device.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)" + (f", {len(devices)} devices" if len(devices) > 1 else "") + processes
    kind = _mac_chip() if device.platform == "METAL" else device.device_kind
    return f"{device.platform}: " + (f"{len(devices)} x {kind}" if len(devices) > 1 else kind) + processes


def _mac_chip() -> str:
    """The Mac's chip ("Apple M2"): jax-metal's devices all call themselves "Metal"."""
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or "Metal"
    except (OSError, subprocess.SubprocessError):
        return "Metal"


def has_cudnn_attention() -> bool:
    """Whether jax.nn.dot_product_attention(implementation="cudnn") can run: JAX on an NVIDIA (CUDA) GPU of
    compute capability 8.0 (Ampere) or later, which cuDNN's fused attention needs."""
    device = jax.devices()[0]
    if platform_of(device) != "cuda":
        return False
    return float(getattr(device, "compute_capability", "0")) >= 8.0


@functools.cache
def _refuses(platform: str, dtype: str) -> bool:
    """Whether this backend fails a tiny matrix product in `dtype`; if so, one warning line (once a process)
    says what it said and that the model computes in float32 instead."""
    try:
        x = jnp.ones((4, 4), dtype)
        jax.block_until_ready(jax.jit(lambda a: a @ a)(x))
    except Exception as e:  # whatever a plugin raises for a type it lacks
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        print(f"warning: this {platform} device refuses --config.model.dtype={dtype} ({reason}); computing in "
              "float32 instead", file=sys.stderr)
        return True
    return False


def resolve(config: ml_collections.ConfigDict, backend: Backend) -> None:
    """Write the profile's choice into every "auto" value of `config` (an explicit value wins), then check what
    the device cannot run: a UserError, or, for a 16-bit dtype Metal refuses, one warning line and float32."""
    from mygpt_jax.config import validate  # config.py imports nothing of the backends

    m, s = config.model, config.sample
    if m.dtype == "auto":
        m.dtype = backend.dtype
    elif backend.probe_dtype and m.dtype != "float32" and _refuses(backend.platform, m.dtype):
        m.dtype = "float32"
    if m.attention == "auto":
        fused_ok = m.drop_rate == 0.0 and (backend.attention != "cudnn" or (m.dtype != "float32" and
                                                                            has_cudnn_attention()))
        m.attention = backend.attention if fused_ok else "explicit"
    if s.decode_loop == "auto":
        s.decode_loop = backend.decode_loop
    validate(config)  # the resolved values together (cuDNN's attention and a float32 dtype, ...)
    if m.attention == "cudnn" and not has_cudnn_attention():
        raise UserError(f"model.attention='cudnn' needs an NVIDIA GPU of compute capability 8.0 or later; this jax "
                        f"runs on {describe()}: use --config.model.attention=xla or explicit")
