"""Measure training and decoding against the machine's own limits, in one process and one run.

    python -m mygpt_jax.bench --config configs/verdict.py [--json] [--config.model.dtype=bfloat16]

Reported, each next to the limit it is measured against:
- matmul rate: `jnp.dot` of two square float32 (and bfloat16) matrices, 2 n^3 FLOPs each;
- copy bandwidth: a jitted elementwise pass over a large array (bytes read + bytes written per second);
- train step: tokens/s, compile time apart, and achieved FLOP/s as a fraction of the matmul rate (the CPU
  analogue of MFU). FLOPs per token (`model.matmul_flops_per_token`): 6 x (weights used in matmuls:
  attention, MLP and the LM head; the token-embedding lookup is free) + 12 L d T for attention scores and
  the weighted sum; forward + backward = 3 x forward;
- decode (batch 1, greedy) with the KV cache and by full recompute, tokens/s, and the cached rate as a
  fraction of the bandwidth limit: every weight read once per token, at half the copy bandwidth (a copy
  reads and writes);
- peak host memory (max RSS).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.model import GPT, ModelConfig, count_params, init_params, matmul_flops_per_token
from mygpt_jax.train import TrainState, create_optimizer, make_train_step

_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps (after one compiling step).")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 32, "Tokens decoded with the KV cache.")
_RECOMPUTE_TOKENS = flags.DEFINE_integer("recompute_tokens", 4, "Tokens decoded by full recompute.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matrices of the matmul test.")
_COPY_MB = flags.DEFINE_integer("copy_mb", 256, "Size of the array of the bandwidth test, in MiB.")


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call of fn (one warm-up call first, results waited for)."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def matmul_rate(n: int, dtype: Any) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / _timed(lambda: dot(a, a), 3)


def copy_bandwidth(megabytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by a jitted elementwise pass (in place: no page faults timed)."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    scale = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
    x = jax.block_until_ready(scale(x))
    start = time.perf_counter()
    for _ in range(repeats):
        x = scale(x)
    jax.block_until_ready(x)
    return 2 * x.nbytes * repeats / (time.perf_counter() - start)


def bench_train(config: ml_collections.ConfigDict, cfg: ModelConfig, steps: int) -> dict:
    t = config.train
    tx = create_optimizer(t, 1000)
    params = init_params(cfg, jax.random.key(0))
    state = TrainState(jnp.int32(0), params, tx.init(params))
    step = jax.jit(make_train_step(GPT(cfg), tx, t.grad_accum_steps), donate_argnums=(0,))
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (t.batch_size, cfg.context_length + 1)),
                        jnp.int32)
    rng = jax.random.key(1)
    start = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    tokens_per_s = t.batch_size * cfg.context_length / step_s
    return {"compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens_per_s,
            "flops_per_s": tokens_per_s * matmul_flops_per_token(cfg), "num_params": count_params(params)}


def bench_decode(cfg: ModelConfig, params: Any, new_tokens: int, recompute_tokens: int) -> dict:
    prompt = [int(i) for i in np.random.default_rng(0).integers(0, cfg.vocab_size, 8)]
    settings = SamplingSettings(max_new_tokens=new_tokens, stop_token=None)
    generator = Generator(cfg, params, settings)
    rng = jax.random.key(0)
    start = time.perf_counter()
    generator.generate(prompt, rng)
    compile_s = time.perf_counter() - start
    cached_s = _timed(lambda: generator.generate(prompt, rng)[0], 1)

    model = GPT(cfg)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def recompute() -> list[int]:  # no cache: the whole (fixed-shape) context through the model per token
        ids = list(prompt)
        for _ in range(recompute_tokens):
            padded = np.zeros((1, cfg.context_length), np.int32)
            padded[0, :len(ids)] = ids
            ids.append(int(jnp.argmax(forward(params, padded)[0, len(ids) - 1])))
        return ids

    recompute_s = _timed(recompute, 1)
    return {"decode_compile_s": compile_s, "decode_tokens_per_s": new_tokens / cached_s,
            "recompute_tokens_per_s": recompute_tokens / recompute_s}


def main(config: ml_collections.ConfigDict) -> None:
    cfg = ModelConfig.from_config(config.model)
    device = jax.devices()[0]
    compute = jnp.dtype(cfg.dtype)
    report: dict[str, Any] = {"device": f"{device.platform}:{device.device_kind}", "dtype": cfg.dtype,
                              "batch_size": config.train.batch_size, "context_length": cfg.context_length}
    report["matmul_flops_per_s_float32"] = matmul_rate(_MATMUL_SIZE.value, jnp.float32)
    report["matmul_flops_per_s_bfloat16"] = matmul_rate(_MATMUL_SIZE.value, jnp.bfloat16)
    report["copy_bytes_per_s"] = copy_bandwidth(_COPY_MB.value)

    train = bench_train(config, cfg, _STEPS.value)
    peak = report["matmul_flops_per_s_bfloat16" if compute == jnp.bfloat16 else "matmul_flops_per_s_float32"]
    report.update(num_params=train["num_params"], compile_s=train["compile_s"], train_step_s=train["step_s"],
                  train_tokens_per_s=train["tokens_per_s"], train_flops_per_s=train["flops_per_s"],
                  train_flops_fraction=train["flops_per_s"] / peak)

    decode_cfg = dataclasses.replace(cfg, drop_rate=0.0)
    params = init_params(decode_cfg, jax.random.key(0))
    decode = bench_decode(decode_cfg, params, _DECODE_TOKENS.value, _RECOMPUTE_TOKENS.value)
    weight_bytes = sum(p.nbytes for p in jax.tree_util.tree_leaves(params))
    limit = report["copy_bytes_per_s"] / 2 / weight_bytes
    report.update(decode, decode_limit_tokens_per_s=limit,
                  decode_bandwidth_fraction=decode["decode_tokens_per_s"] / limit,
                  kv_cache_speedup=decode["decode_tokens_per_s"] / decode["recompute_tokens_per_s"],
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if _JSON.value:
        print(json.dumps(report))
        return
    rows = [("device", report["device"]),
            ("matmul float32 / bfloat16", f"{report['matmul_flops_per_s_float32'] / 1e9:.1f} / "
                                          f"{report['matmul_flops_per_s_bfloat16'] / 1e9:.1f} GFLOP/s"),
            ("copy bandwidth (read + write)", f"{report['copy_bytes_per_s'] / 1e9:.1f} GB/s"),
            (f"train step ({cfg.dtype}, batch {config.train.batch_size} x {cfg.context_length})",
             f"{report['train_step_s']:.2f} s, {report['train_tokens_per_s']:.0f} tokens/s, "
             f"{report['train_flops_per_s'] / 1e9:.1f} GFLOP/s = {report['train_flops_fraction']:.2f} of matmul"),
            ("train compile", f"{report['compile_s']:.1f} s"),
            ("decode, KV cache", f"{report['decode_tokens_per_s']:.1f} tokens/s = "
                                 f"{report['decode_bandwidth_fraction']:.2f} of the bandwidth limit "
                                 f"({limit:.1f} tokens/s)"),
            ("decode, full recompute", f"{report['recompute_tokens_per_s']:.2f} tokens/s "
                                       f"(KV cache {report['kv_cache_speedup']:.1f}x faster)"),
            ("peak host memory", f"{report['peak_rss_gb']:.1f} GB")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)
