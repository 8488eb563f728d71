"""The backend profiles: which platform gets which, what "auto" resolves to, and that the model, the trainer and
the generator compute as their profile says (each field that differs between profiles)."""

import dataclasses
import functools
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mygpt_jax import backends, steps
from mygpt_jax.backends import AS_TRAINED, STOCK, cpu, for_platform
from mygpt_jax.config import base_config, changed_settings
from mygpt_jax.errors import UserError
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.model import GPT, ModelConfig, init_cache, init_params, logical_axes

CFG = ModelConfig(vocab_size=512, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
CPU, CUDA = for_platform("cpu"), for_platform("cuda")


@pytest.mark.parametrize("platform, dtype, attention, decode_loop, kernels", [
    ("cpu", "float32", "explicit", "device", True),
    ("cuda", "bfloat16", "cudnn", "device", False),
    ("rocm", "bfloat16", "explicit", "device", False),
    ("tpu", "bfloat16", "explicit", "device", False),
    ("METAL", "float32", "explicit", "host", False),
    ("a_new_plugin", "float32", "explicit", "device", False),
])
def test_each_platform_gets_its_profile(platform, dtype, attention, decode_loop, kernels):
    """The XLA:CPU kernels on CPUs only; the stock layers everywhere else."""
    p = for_platform(platform)
    assert (p.platform, p.dtype, p.attention, p.decode_loop) == (platform, dtype, attention, decode_loop)
    assert (p.dropout, p.dot_general, p.decode_layout) == ((cpu.Dropout, cpu.dot_general, cpu.TRANSPOSED) if kernels
                                                           else (nn.Dropout, jax.lax.dot_general, AS_TRAINED))
    assert p.probe_dtype == (platform == "METAL")
    if not kernels:
        assert p.jit_options() == {}


def test_a_gpu_is_told_apart_as_cuda_or_rocm():
    def device(platform, version=""):
        return types.SimpleNamespace(platform=platform, client=types.SimpleNamespace(platform_version=version))

    assert backends.platform_of(device("gpu", "PJRT C API\ncuda 12040")) == "cuda"
    assert backends.platform_of(device("gpu", "PJRT C API\nrocm 60200")) == "rocm"
    assert backends.platform_of(device("METAL")) == "METAL" and backends.platform_of(device("tpu")) == "tpu"
    assert backends.current() == for_platform(backends.platform_of(jax.devices()[0]))


def resolved(backend, **overrides):
    config = base_config()
    for key, value in overrides.items():
        group, name = key.split("__")
        config[group][name] = value
    backends.resolve(config, backend)
    return config.model.dtype, config.model.attention, config.sample.decode_loop


def test_auto_values_resolve_to_the_profiles_and_explicit_values_win():
    assert resolved(CPU) == ("float32", "explicit", "device")
    assert resolved(for_platform("METAL")) == ("float32", "explicit", "host")
    assert resolved(for_platform("tpu")) == ("bfloat16", "explicit", "device")
    # cuDNN's attention only where it runs and the config allows it: no dropout, 16 bits, a GPU that has it.
    assert resolved(CUDA)[1] == "explicit"  # drop_rate 0.1
    assert resolved(CUDA, model__drop_rate=0.0)[1] == ("cudnn" if backends.has_cudnn_attention() else "explicit")
    assert resolved(CUDA, model__drop_rate=0.0, model__dtype="float32")[1] == "explicit"
    assert resolved(CPU, model__dtype="bfloat16", sample__decode_loop="host",
                    model__attention="xla", model__drop_rate=0.0) == ("bfloat16", "xla", "host")
    if not backends.has_cudnn_attention():
        with pytest.raises(UserError, match=r"model.attention='cudnn' needs an NVIDIA GPU"):
            resolved(CPU, model__attention="cudnn", model__drop_rate=0.0, model__dtype="bfloat16")
    with pytest.raises(UserError, match="cuDNN's fused attention runs in 16 bits"):  # checked once resolved
        resolved(for_platform("METAL"), model__attention="cudnn", model__drop_rate=0.0)


def test_a_probed_dtype_is_kept_where_the_device_computes_it_and_float32_replaces_it_once_refused(capsys):
    probing = dataclasses.replace(CPU, probe_dtype=True)
    assert resolved(probing, model__dtype="bfloat16")[0] == "bfloat16"
    assert capsys.readouterr().err == ""
    # No Mac here: a dtype JAX itself cannot make stands in for one Metal refuses.
    assert backends._refuses("METAL", "not_a_dtype") and backends._refuses("METAL", "not_a_dtype")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("; computing in float32 instead")
    assert lines[0].startswith("warning: this METAL device refuses --config.model.dtype=not_a_dtype (")


def test_a_checkpoint_from_before_auto_values_resumes_without_a_changed_setting():
    """Its config says attention="explicit", dtype="float32" and has no sample.decode_loop."""
    saved = base_config().to_dict()
    saved["model"].update(attention="explicit", dtype="float32")
    del saved["sample"]["decode_loop"]
    config = base_config()
    backends.resolve(config, CPU)
    assert changed_settings(saved, config) == []
    config.model.dtype = "bfloat16"
    assert changed_settings(saved, config) == ["model.dtype: 'float32' -> 'bfloat16'"]


def step_jaxpr(backend, drop_rate=0.0):
    cfg = dataclasses.replace(CFG, drop_rate=drop_rate)
    tx = optax.sgd(0.1)
    params = init_params(cfg, jax.random.key(0))
    state = steps.TrainState(jnp.int32(0), params, tx.init(params))
    batch = jnp.zeros((2, cfg.context_length + 1), jnp.int32)
    return str(jax.make_jaxpr(steps.make_train_step(GPT(cfg, backend), tx, 1))(state, batch, jax.random.key(0)))


def test_the_cpu_profiles_weight_gradients_are_plain_matmuls_with_autodiffs_gradients():
    # the backward of `cpu.matmul` materialises x^T behind an optimization barrier
    assert "optimization_barrier" in step_jaxpr(CPU) and "optimization_barrier" not in step_jaxpr(CUDA)
    params = init_params(CFG, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (2, CFG.context_length + 1), 0, CFG.vocab_size)
    for tie in (False, True):
        cfg = dataclasses.replace(CFG, tie_embeddings=tie)
        tied = init_params(cfg, jax.random.key(0)) if tie else params
        grads = [jax.jit(jax.grad(functools.partial(steps.loss_fn, GPT(cfg, backend))))(tied, batch, None)
                 for backend in (CPU, CUDA)]
        for a, b in zip(*map(jax.tree_util.tree_leaves, grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_cpu_matmul_has_autodiffs_values_and_gradients(dtype, tolerance):
    x, w, dy = (jax.random.normal(jax.random.key(i), shape, dtype)
                for i, shape in enumerate([(2, 5, 8), (8, 3), (2, 5, 3)]))

    def value_and_grads(product):
        return jax.jit(jax.value_and_grad(lambda x, w: (product(x, w) * dy).sum(), argnums=(0, 1)))(x, w)

    ours, autodiff = value_and_grads(cpu.matmul), value_and_grads(lambda x, w: x @ w)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(autodiff), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tolerance, atol=tolerance)


def random_bits_shapes(jaxpr: str) -> set[str]:
    return set(re.findall(r"random_bits\[[^\]]*shape=\(([^)]*)\)", jaxpr))


def test_dropout_bits_come_from_a_counter_hash_on_cpu_and_from_jax_random_elsewhere():
    """The CPU profile draws two numbers per dropout layer and hashes a counter; the others (nn.Dropout) draw
    every element's bits with jax.random."""
    assert random_bits_shapes(step_jaxpr(CPU, drop_rate=0.1)) == {"2,"}
    gpu_shapes = random_bits_shapes(step_jaxpr(CUDA, drop_rate=0.1))
    # the residual stream, and the attention weights with the heads as (key/value heads, heads sharing each)
    assert "2, 16, 32" in gpu_shapes and "2, 4, 1, 16, 16" in gpu_shapes


# 2 ** 32: an element counter; 1000: the (row, column) hash that arrays of 2 ** 32 elements or more use
@pytest.mark.parametrize("counter_limit", [2 ** 32, 1000])
def test_the_counter_hash_dropout_drops_at_its_rate_and_keeps_the_mean(counter_limit):
    x = jnp.ones((200, 500))

    def drop(key):
        return cpu.Dropout(0.1, counter_limit).apply({}, x, False, rngs={"dropout": key})

    a, b, a_again = drop(jax.random.key(0)), drop(jax.random.key(1)), drop(jax.random.key(0))
    assert abs(float(jnp.mean(a == 0)) - 0.1) < 0.005
    np.testing.assert_allclose(np.unique(np.asarray(a)), [0.0, 1 / 0.9], rtol=1e-6)
    np.testing.assert_array_equal(a, a_again)  # reproducible from the key
    assert float(jnp.mean((a == 0) & (b == 0))) < 0.015  # independent masks: about 0.1 x 0.1
    assert float(jnp.mean((a[:-1] == 0) & (a[1:] == 0))) < 0.015  # and rows: no counter wrapped around
    np.testing.assert_array_equal(cpu.Dropout(0.1).apply({}, x, True), x)


@pytest.mark.parametrize("tie", [False, True])
def test_the_cpu_decoding_layout_gives_the_same_logits(tie):
    """The Generator's CPU weights (dense kernels stored transposed) change no logits, with the KV cache or
    without, the tied head included; other profiles keep the weights as trained."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tie, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    expected, _ = jax.jit(GPT(cfg, STOCK).apply)({"params": params}, tokens)
    for backend in (CPU, CUDA):
        generator = Generator(cfg, params, SamplingSettings(), backend)
        c_fc = generator.params["h_0"]["mlp"]["c_fc"]
        assert set(c_fc) == ({"kernel_t", "bias"} if backend is CPU else {"kernel", "bias"})
        for cache in (None, init_cache(cfg, 2)):
            logits, _ = jax.jit(generator.apply)(generator.params, tokens, cache=cache)
            np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_the_decoding_layout_has_logical_axis_names_for_every_stored_weight():
    params = Generator(CFG, init_params(CFG, jax.random.key(0)), SamplingSettings(), CPU).params
    axes = logical_axes(CFG, CPU.decode_layout)
    assert tuple(axes["h_0"]["mlp"]["c_fc"]["kernel_t"]) == ("mlp", "embed")
    assert tuple(logical_axes(CFG)["h_0"]["mlp"]["c_fc"]["kernel"]) == ("embed", "mlp")
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: not isinstance(x, dict))[0])
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat_params) == len(flat_axes)
    for path, value in flat_params:
        assert len(flat_axes[path]) == value.ndim, path


def test_the_suite_and_the_commands_it_starts_compute_on_the_cpu():
    """Pinned in tests/__init__.py: on a machine with a GPU the suite runs as on one without."""
    from tests.utils import cli_env

    assert jax.default_backend() == "cpu"
    assert cli_env()["JAX_PLATFORMS"] == "cpu"
