"""How fast training and decoding run, against what this machine can do: all measured in one process.

    python -m mygpt_jax.bench --config configs/verdict.py
    python -m mygpt_jax.bench --config configs/verdict.py --config.model.dtype=bfloat16 --json
    python -m mygpt_jax.bench --config configs/tiny.py --prepare        # the data instead: mygpt_jax/bench_data.py
    python -m mygpt_jax.bench --config configs/pystdlib_modern.py --switches   # each modern switch's train tokens/s
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mygpt_jax.bench --config configs/gpt2_1558m.py \
      --config.mesh.data=1 --config.mesh.fsdp=8 --memory                 # per-device memory on a mesh

Measured in this order, on JAX's default device, each after a warm-up, with compile times kept apart:

machine    matmul rate: jnp.dot of two random square matrices (--matmul_size), float32 and bfloat16,
           2 n^3 FLOPs per product. Read bandwidth: a sum over a float32 array of --copy_mb, bytes read
           per second; copy bandwidth: y = x + 1 on it in place (donated), bytes read + written per
           second. All are limits, so each is the best of 5 runs, measured before the train step and
           again after decoding (other jobs only slow down). See mygpt_jax/hardware.py.
train      the config's model, batch size, gradient accumulation, optimizer and dtype, jitted as train.py
           does (whole step, donated state) on random tokens; --steps steps with one sync at the end, and
           the host page faults they took (memory the allocator got afresh from the kernel; docs/performance.md).
           FLOPs come from `matmul_flops_per_token`: 6 FLOPs per matmul weight per token (2 forward,
           4 backward) + 12 L d T for the attention scores and weighted sums; elementwise work is not
           counted. The fraction is achieved FLOP/s over the measured matmul rate of the compute dtype
           (the CPU analogue of MFU); on a GPU in hardware.GPU_PEAK_FLOPS, MFU against the chip's peak too.
decode     batch 1, greedy, --decode_tokens new tokens after the config's prompt, with the Generator
           (prefill, then the KV-cache decode loop sample.decode_loop names); the prompt's prefill is
           included. Once to compile, then the best of --decode_runs, as for the limits it is compared with. The
           bandwidth limit is the read bandwidth over the bytes of weights one token reads (every matmul
           weight, and the whole of wte when the head is tied; one row of each embedding table).
recompute  the same greedy decoding without a cache: every token runs the model over the whole padded
           context. The shape never changes, so each token costs the same and --recompute_tokens tokens
           (one timed run: each costs a full forward pass) give the rate of any longer run; its tokens are
           checked against the cached decoding.
profile    with --profile, one more train step compiled to record its XLA ops in a jax.profiler trace:
           the seconds of each kind of op (mygpt_jax/profiling.py), in the report and as `train_profile`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from mygpt_jax import backends, hardware, profiling, run_setup, sharding
from mygpt_jax.backends import Backend
from mygpt_jax.config import GPT2_SWITCHES
from mygpt_jax.errors import UserError
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.model import ModelConfig, count_params, init_params, matmul_flops_per_token
from mygpt_jax.overrides import get_value, set_value
from mygpt_jax.tokenizer import encode

_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps (after one warm-up step).", lower_bound=1)
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 200, "New tokens per decoding (capped to fit the context).",
                                      lower_bound=1)
_RECOMPUTE_TOKENS = flags.DEFINE_integer("recompute_tokens", 4, "Tokens decoded without a cache (each costs a "
                                         "forward pass over the whole context).", lower_bound=1)
_DECODE_RUNS = flags.DEFINE_integer("decode_runs", 3, "Timed decodings (the fastest counts).", lower_bound=1)
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matrices of the matmul rate.",
                                    lower_bound=1)
_PROFILE = flags.DEFINE_bool("profile", False, "Also time one train step op by op (jax.profiler) and report where "
                              "its time goes.")
_MEMORY = flags.DEFINE_bool("memory", False, "Report instead the per-device bytes of the train state and the compiled "
                            "step on the config's mesh (XLA's memory analysis: nothing is allocated).")
_PREPARE = flags.DEFINE_bool("prepare", False, "Benchmark the data instead: corpus preparation, training from a "
                             "memory map, start-up (mygpt_jax/bench_data.py).")
_PREPARE_MB = flags.DEFINE_list("prepare_mb", ["20", "200"], "Sizes of the corpora --prepare generates (MB).")
_DATA_STEPS = flags.DEFINE_integer("data_steps", 20, "Train steps per round of --prepare's data feeding comparison.",
                                   lower_bound=1)
_DATA_ROUNDS = flags.DEFINE_integer("data_rounds", 3, "Rounds of --prepare's data feeding comparison.", lower_bound=1)
_SWITCHES = flags.DEFINE_bool("switches", False, "Report instead the train tokens/s of GPT-2's architecture and AdamW "
                                "beside each of the config's modern switches alone and the config as it is "
                                "(docs/modern.md).")
_COPY_MB = flags.DEFINE_integer("copy_mb", 256, "Size of the array read and copied for the memory bandwidths "
                                "(MiB).", lower_bound=1)


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine_limits(backend: Backend) -> dict[str, float]:
    return {"matmul_flops_per_s_float32": hardware.matmul_rate(_MATMUL_SIZE.value, "float32", backend),
            "matmul_flops_per_s_bfloat16": hardware.matmul_rate(_MATMUL_SIZE.value, "bfloat16", backend),
            "read_bytes_per_s": hardware.read_bandwidth(_COPY_MB.value),
            "copy_bytes_per_s": hardware.copy_bandwidth(_COPY_MB.value)}


def weight_bytes_per_token(cfg: ModelConfig, params: Any) -> int:
    """Bytes of weights one decoding step reads: all but the embedding tables (one row of each is read),
    except that a tied LM head reads all of wte."""
    positions = params["wpe"]["embedding"].nbytes if "wpe" in params else 0  # none with rotary positions
    tables = positions + (0 if cfg.tie_embeddings else params["wte"]["embedding"].nbytes)
    return sum(p.nbytes for p in jax.tree_util.tree_leaves(params)) - tables


def bench_train(config: ml_collections.ConfigDict, cfg: ModelConfig, backend: Backend, n_steps: int,
                profile: bool = False) -> dict[str, Any]:
    """Tokens/s and FLOP/s of the jitted train step as train.py runs it (on the config's mesh, the state made and
    the step jitted with its shardings), compile time apart; with `profile`, also {XLA op kind: (seconds,
    count)} of one more step (`profiling.op_seconds`)."""
    t = config.train
    run = run_setup.setup(config, n_steps + t.warmup_steps + 2, backend)
    state = run.fresh_state(jax.random.key(t.seed))
    num_params = count_params(state.params)
    shape = (t.grad_accum_steps, run.micro_batch, cfg.context_length + 1)
    batch = jax.device_put(jax.random.randint(jax.random.key(1), shape, 0, cfg.vocab_size), run.batch_sharding)
    rng = sharding.put(jax.random.key(2), sharding.replicated(run.mesh))

    compiled, compile_s = run.compile_train_step(state, batch, rng)
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(n_steps):  # no host sync inside the loop, as in training
        state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / n_steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n_steps
    tokens_per_s = t.batch_size * cfg.context_length / step_s
    result = {"num_params": num_params, "train_compile_s": compile_s, "train_step_s": step_s,
              "train_page_faults_per_step": faults, "train_mesh": dict(run.mesh.shape),
              "train_devices": run.mesh.size, "train_tokens_per_s": tokens_per_s,
              "train_tokens_per_s_per_device": tokens_per_s / run.mesh.size,
              "train_flops_per_s": tokens_per_s * matmul_flops_per_token(cfg)}
    if profile:
        _progress("train step: compiling it to record its ops, then one profiled step")
        profiled_step, _ = run.compile_train_step(state, batch, rng, profile=True)
        state, metrics = profiled_step(state, batch, rng)  # warm-up
        jax.block_until_ready(metrics)
        result["train_profile"] = profiling.op_seconds(lambda: profiled_step(state, batch, rng)[1])
    return result


def bench_memory(config: ml_collections.ConfigDict, cfg: ModelConfig, backend: Backend) -> dict[str, Any]:
    """Per-device bytes of the train state (parameters and optimizer state) on the config's mesh, from the
    shards' shapes, against the whole state; and the compiled train step's memory analysis. Only shapes are
    made, so any model size can be measured with CPU devices standing in for accelerators."""
    t = config.train
    run = run_setup.setup(config, 1000, backend)
    state = run.abstract_state()
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
    batch = jax.ShapeDtypeStruct((t.grad_accum_steps, run.micro_batch, cfg.context_length + 1), jnp.int32,
                                 sharding=run.batch_sharding)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(run.mesh))
    _progress(f"compiling the train step on the mesh {dict(run.mesh.shape)} for its memory analysis")
    analysis = run.compile_train_step(state, batch, rng)[0].memory_analysis()
    per_device = sharding.shard_bytes(state)
    result = {"mesh": dict(run.mesh.shape), "devices": run.mesh.size, "num_params": count_params(state.params),
              "state_bytes_total": whole, "state_bytes_per_device": per_device, "state_fraction": per_device / whole}
    if analysis is not None:  # per device: the step's arguments (the state, the batch), outputs and temporaries
        result.update(step_argument_bytes=analysis.argument_size_in_bytes,
                      step_output_bytes=analysis.output_size_in_bytes, step_alias_bytes=analysis.alias_size_in_bytes,
                      step_temp_bytes=analysis.temp_size_in_bytes,
                      step_peak_bytes=analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    return result


def memory_report(r: dict[str, Any]) -> str:
    lines = [f"mesh {r['mesh']} ({r['devices']} devices), {r['num_params']:,} parameters: train state "
             f"{r['state_bytes_per_device'] / 1e9:.3f} GB per device of {r['state_bytes_total'] / 1e9:.3f} GB "
             f"({r['state_fraction']:.4f}; 1/{r['devices']} = {1 / r['devices']:.4f})"]
    if "step_peak_bytes" in r:
        lines.append(f"compiled train step per device: arguments {r['step_argument_bytes'] / 1e9:.3f} GB, outputs "
                     f"{r['step_output_bytes'] / 1e9:.3f} GB ({r['step_alias_bytes'] / 1e9:.3f} GB of them in the "
                     f"donated arguments), temporaries {r['step_temp_bytes'] / 1e9:.3f} GB: "
                     f"{r['step_peak_bytes'] / 1e9:.3f} GB in all")
    return "\n".join(lines)


def recompute_decode(generator: Generator, prompt: list[int], n_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decoding without a KV cache, on the generator's weights: (tokens, compile seconds, seconds for
    n_tokens)."""
    cfg, params = generator.cfg, generator.params

    def decode(params: Any, tokens: jax.Array) -> jax.Array:
        def next_token(i: jax.Array, tokens: jax.Array) -> jax.Array:
            logits, _ = generator.apply(params, tokens)  # the whole padded context, every time
            return tokens.at[0, len(prompt) + i].set(jnp.argmax(logits[0, len(prompt) + i - 1]).astype(jnp.int32))

        return jax.lax.fori_loop(0, n_tokens, next_token, tokens)

    padded = jnp.zeros((1, cfg.context_length), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))
    start = time.perf_counter()
    compiled = jax.jit(decode, **generator.backend.jit_options()).lower(params, padded).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = np.asarray(compiled(params, padded))
    run_s = time.perf_counter() - start
    return tokens[0, len(prompt):len(prompt) + n_tokens].tolist(), compile_s, run_s


def bench_decode(config: ml_collections.ConfigDict, cfg: ModelConfig, backend: Backend, new_tokens: int, runs: int,
                 recompute_tokens: int) -> dict[str, Any]:
    """Batch-1 greedy decoding with the KV cache, and without it (full recompute)."""
    cfg = dataclasses.replace(cfg, drop_rate=0.0)
    prompt = encode(config.sample.prompt or "Every effort moves you")[-(cfg.context_length // 2):]
    new_tokens = min(new_tokens, cfg.context_length - len(prompt))
    _progress(f"decoding {new_tokens} tokens with the KV cache, 1 + {runs} times (the first compiles)")
    generator = Generator(cfg, init_params(cfg, jax.random.key(0)),
                          SamplingSettings(max_new_tokens=new_tokens, stop_token=None,
                                           decode_loop=config.sample.decode_loop), backend)
    start = time.perf_counter()
    generator.generate(prompt, jax.random.key(0))
    first_s = time.perf_counter() - start
    run_s = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        (cached,), _ = generator.generate(prompt, jax.random.key(0))
        run_s = min(run_s, time.perf_counter() - start)

    recompute_tokens = min(recompute_tokens, new_tokens)
    _progress(f"decoding {recompute_tokens} tokens without the cache")
    recomputed, recompute_compile_s, recompute_s = recompute_decode(generator, prompt, recompute_tokens)
    return {"decode_compile_s": max(first_s - run_s, 0.0), "decode_tokens": new_tokens,
            "decode_tokens_per_s": new_tokens / run_s,
            "decode_bytes_per_token": weight_bytes_per_token(cfg, generator.params),
            "recompute_compile_s": recompute_compile_s, "recompute_tokens_per_s": recompute_tokens / recompute_s,
            "recompute_matches": recomputed == cached[:recompute_tokens]}


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def run_benchmark(config: ml_collections.ConfigDict) -> dict[str, Any]:
    cfg, backend = ModelConfig.from_config(config.model), backends.current()
    if _PROFILE.value and not hardware.can_read_profiles():
        raise UserError(f"--profile needs a jax that reads profiler traces back (jax.profiler.ProfileData); "
                        f"this is jax {jax.__version__}: upgrade jax, or run without --profile")
    _progress(f"matmul rate ({_MATMUL_SIZE.value}^2) and memory bandwidth ({_COPY_MB.value} MiB)")
    limits = machine_limits(backend)
    _progress(f"train step: compiling, then 1 + {_STEPS.value} steps")
    result = bench_train(config, cfg, backend, _STEPS.value, _PROFILE.value)
    result.update(bench_decode(config, cfg, backend, _DECODE_TOKENS.value, _DECODE_RUNS.value,
                               _RECOMPUTE_TOKENS.value))
    _progress("matmul rate and memory bandwidth again")
    again = machine_limits(backend)
    limits = {key: max(value, again[key]) for key, value in limits.items()}

    peak = hardware.gpu_peak_flops()
    reference = "bfloat16" if cfg.dtype == "bfloat16" else "float32"  # the matmul rate the step is compared with
    decode_limit = limits["read_bytes_per_s"] / result["decode_bytes_per_token"]
    result.update(
        limits, device=backends.describe(), dtype=cfg.dtype, attention=cfg.attention,
        decode_loop=config.sample.decode_loop,
        batch_size=config.train.batch_size,
        context_length=cfg.context_length, train_flops_reference=reference,
        # Of the devices together: the rate and the peak are one device's.
        train_flops_fraction=result["train_flops_per_s"] / (limits[f"matmul_flops_per_s_{reference}"]
                                                            * result["train_devices"]),
        train_mfu=None if peak is None else result["train_flops_per_s"] / (peak * result["train_devices"]),
        decode_limit_tokens_per_s=decode_limit, decode_bandwidth_fraction=result["decode_tokens_per_s"] / decode_limit,
        kv_cache_speedup=result["decode_tokens_per_s"] / result["recompute_tokens_per_s"],
        compile_s=result["train_compile_s"] + result["decode_compile_s"] + result["recompute_compile_s"],
        peak_rss_gb=_peak_rss_bytes() / 1e9,
    )
    return result


def profile_lines(ops: dict[str, tuple[float, int]], top: int = 12) -> list[str]:
    """The op kinds that took most of one profiled train step, one line each."""
    total = sum(s for s, _ in ops.values())
    if not total:
        return ["where the train step's time goes: no per-op events were recorded (this backend records none)"]
    lines = [f"where one train step's {total:.2f} s goes (XLA ops, those running at once sharing the time; "
             "seconds, share, how many):"]
    lines += [f"  {kind:<32} {s:7.3f} s {s / total:6.1%} {n:6d}" for kind, (s, n) in list(ops.items())[:top]]
    rest = list(ops.values())[top:]
    if rest:
        rest_s = sum(s for s, _ in rest)
        lines.append(f"  {'the other ' + str(len(rest)) + ' kinds':<32} {rest_s:7.3f} s {rest_s / total:6.1%} "
                     f"{sum(n for _, n in rest):6d}")
    return lines


def report(r: dict[str, Any]) -> str:
    mfu = "" if r["train_mfu"] is None else f"; MFU {r['train_mfu']:.2f} of the chip's bf16 peak"
    profile = profile_lines(r["train_profile"]) if "train_profile" in r else []
    return "\n".join([
        f"device: {r['device']}; model {r['num_params']:,} parameters, {r['dtype']}, context {r['context_length']}, "
        f"{r['attention']} attention, decode loop on the {r['decode_loop']}",
        f"matmul rate: {r['matmul_flops_per_s_float32'] / 1e9:.1f} GFLOP/s float32, "
        f"{r['matmul_flops_per_s_bfloat16'] / 1e9:.1f} GFLOP/s bfloat16; "
        f"memory read {r['read_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"copy (read + write) {r['copy_bytes_per_s'] / 1e9:.1f} GB/s",
        f"train step (batch {r['batch_size']} x {r['context_length']}): {r['train_step_s']:.2f} s, "
        f"{r['train_tokens_per_s']:.1f} tokens/s, {r['train_flops_per_s'] / 1e9:.1f} GFLOP/s = "
        f"{r['train_flops_fraction']:.2f} of the {r['train_flops_reference']} matmul rate{mfu}; "
        f"{r['train_page_faults_per_step']:,.0f} page faults per step",
        f"decode (batch 1, {r['decode_tokens']} tokens, KV cache): {r['decode_tokens_per_s']:.2f} tokens/s = "
        f"{r['decode_bandwidth_fraction']:.2f} of the bandwidth limit {r['decode_limit_tokens_per_s']:.2f} tokens/s "
        f"({r['decode_bytes_per_token'] / 1e6:.0f} MB of weights per token)",
        f"decode without cache (full recompute): {r['recompute_tokens_per_s']:.3f} tokens/s; KV cache speedup "
        f"{r['kv_cache_speedup']:.1f}x; same tokens: {r['recompute_matches']}",
        f"compile: {r['compile_s']:.1f} s (train step {r['train_compile_s']:.1f}, decode {r['decode_compile_s']:.1f}, "
        f"recompute {r['recompute_compile_s']:.1f}); peak host memory {r['peak_rss_gb']:.2f} GB",
        *profile,
    ])


def bench_switches(config: ml_collections.ConfigDict, backend: Backend, n_steps: int) -> dict[str, float]:
    """Train tokens/s at the config's size of GPT-2 (every switch at `GPT2_SWITCHES`' value), of GPT-2 with each
    switch the config turns on alone, and of the config: what each switch costs."""
    def tokens_per_s(changes: dict[str, Any]) -> float:
        c = copy.deepcopy(config)
        for key, value in changes.items():
            set_value(c, key, value, "--switches")
        _progress(f"train step of {', '.join(f'{k}={v}' for k, v in changes.items()) or 'the config'}")
        return bench_train(c, ModelConfig.from_config(c.model), backend, n_steps)["train_tokens_per_s"]

    switched = {key: get_value(config, key) for key, gpt2 in GPT2_SWITCHES.items() if get_value(config, key) != gpt2}
    result = {"gpt2": tokens_per_s(GPT2_SWITCHES)}
    result.update({f"{key}={value}": tokens_per_s({**GPT2_SWITCHES, key: value}) for key, value in switched.items()})
    result["config"] = tokens_per_s({})
    return result


def main(config: ml_collections.ConfigDict) -> None:
    if _SWITCHES.value:
        result = bench_switches(config, backends.current(), _STEPS.value)
        print(json.dumps(result) if _JSON.value else "\n".join(
            f"{name:32} {rate:10,.0f} tokens/s  {rate / result['gpt2']:.2f}x GPT-2's" for name, rate in result.items()))
        return
    if _MEMORY.value:
        result = bench_memory(config, ModelConfig.from_config(config.model), backends.current())
        print(json.dumps(result) if _JSON.value else memory_report(result))
        return
    if _PREPARE.value:
        from mygpt_jax import bench_data
        from mygpt_jax.cli import config_path

        result = bench_data.run(config, config_path(), [int(mb) for mb in _PREPARE_MB.value], _DATA_STEPS.value,
                                _DATA_ROUNDS.value)
        print(json.dumps(result) if _JSON.value else bench_data.report(result))
        return
    result = run_benchmark(config)
    print(json.dumps(result) if _JSON.value else report(result))


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main, compilation_cache=False)
