"""The modern model switches (docs/modern.md) against a NumPy model written here, their parameter counts, the fused
attention, KV-cache decoding, a row's own position under jax.vmap, and the bad combinations' one line."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import tiny
from mygpt_jax import backends, sharding
from mygpt_jax.config import validate
from mygpt_jax.errors import UserError
from mygpt_jax.export import export, gpt2_shaped
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.model import GPT, KVCache, ModelConfig, count_params, init_cache, init_params, matmul_flops_per_token
from tests.test_sharding import Shape
from tests.utils import assert_mesh_step_matches, json_on_devices, two_sharded_steps

# 500 tokens padded to 512: soft-capping must leave the padding rows at -inf.
BASE = ModelConfig(vocab_size=500, vocab_multiple=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                   drop_rate=0.0)
SWITCHES = {
    "rope": dict(position="rope"), "rmsnorm": dict(norm="rmsnorm"), "no_norm_scale": dict(norm_scale=False),
    "qk_norm": dict(qk_norm=True), "relu2": dict(mlp="relu2"), "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_kv_heads=2), "mqa": dict(n_kv_heads=1), "no_bias": dict(bias=False, qkv_bias=True),
    "softcap": dict(logit_softcap=0.5), "zero_init_proj": dict(zero_init_proj=True),
}
ALL = dict(position="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=2, bias=False,
           logit_softcap=0.5, zero_init_proj=True)
BACKEND = backends.current()


def cfg_of(**switches) -> ModelConfig:
    return dataclasses.replace(BASE, **switches)


def noisy_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Initial parameters plus noise, so that no bias, gain or zero-initialised projection hides a mistake."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens):
    return GPT(cfg, BACKEND).apply({"params": params}, tokens)[0]


def numpy_logits(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """The model in float64 NumPy, written from the papers: rotary as complex rotation of the pairs (i, i + d/2),
    grouped heads by repeating each key/value head over its group."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, t = tokens.shape
    h, kv, hd = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.emb_dim // cfg.n_heads

    def norm(x, q):
        if cfg.norm == "rmsnorm":
            y = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5)
        else:
            y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        return y * q.get("scale", 1.0) + q.get("bias", 0.0)

    def dense(x, q):
        return x @ q["kernel"] + q.get("bias", 0.0)

    def rope(x):  # (b, t, heads, hd)
        z = x[..., :hd // 2] + 1j * x[..., hd // 2:]
        theta = np.arange(t)[:, None] * cfg.rope_base ** (-2.0 * np.arange(hd // 2) / hd)
        z = z * np.exp(1j * theta)[None, :, None, :]
        return np.concatenate([z.real, z.imag], -1)

    def rms(x):
        return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5)

    act = {"gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
           "relu2": lambda x: np.maximum(x, 0) ** 2, "swiglu": lambda x: x / (1 + np.exp(-x))}[cfg.mlp]
    x = p["wte"]["embedding"][tokens] + (p["wpe"]["embedding"][:t] if cfg.position == "learned" else 0)
    for i in range(cfg.n_layers):
        layer = p[f"h_{i}"]
        qkv = dense(norm(x, layer["ln_1"]), layer["attn"]["c_attn"]).reshape(b, t, h + 2 * kv, hd)
        q, k, v = qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:]
        if cfg.qk_norm:
            q, k = rms(q), rms(k)
        if cfg.position == "rope":
            q, k = rope(q), rope(k)
        k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + dense(np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1), layer["attn"]["c_proj"])
        mlp, y = layer["mlp"], norm(x, layer["ln_2"])
        hidden = act(dense(y, mlp["c_fc"])) * (dense(y, mlp["c_up"]) if cfg.mlp == "swiglu" else 1.0)
        x = x + dense(hidden, mlp["c_proj"])
    x = norm(x, p["ln_f"])
    logits = x @ (p["wte"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"])
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * np.tanh(logits / cfg.logit_softcap)
    return logits[..., :cfg.vocab_size]


TOKENS = np.random.default_rng(0).integers(0, 500, (2, 12))


@pytest.mark.parametrize("name", [*SWITCHES, "all", "all_tied"])
def test_each_switch_computes_the_numpy_model(name):
    switches = {"all": ALL, "all_tied": dict(ALL, tie_embeddings=True)}.get(name) or SWITCHES[name]
    cfg = cfg_of(**switches)
    params = noisy_params(cfg)
    logits = np.asarray(forward(cfg, params, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(logits[..., :500], numpy_logits(cfg, params, TOKENS), rtol=0, atol=2e-5)
    assert np.all(logits[..., 500:] == -np.inf)  # capped first, then the padding rows masked
    if "logit_softcap" in switches:
        assert np.abs(logits[..., :500]).max() < 0.5  # the cap binds at this scale


def expected_count(cfg: ModelConfig) -> int:
    """Parameters counted by hand from the switches."""
    d, v, hd = cfg.emb_dim, cfg.padded_vocab, cfg.emb_dim // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    norm = d * cfg.norm_scale + d * (cfg.bias and cfg.norm == "layernorm")
    qkv = (cfg.n_heads + 2 * kv) * hd
    attn = d * qkv + cfg.qkv_bias * qkv + d * d + cfg.bias * d
    hidden = {"swiglu": round(8 * d / 3 / 8) * 8}.get(cfg.mlp, 4 * d)
    matrices = 3 if cfg.mlp == "swiglu" else 2
    mlp = matrices * d * hidden + cfg.bias * ((matrices - 1) * hidden + d)
    tables = v * d + (cfg.context_length * d if cfg.position == "learned" else 0) + (0 if cfg.tie_embeddings else d * v)
    return tables + cfg.n_layers * (2 * norm + attn + mlp) + norm


@pytest.mark.parametrize("name", [*SWITCHES, "all"])
def test_each_switchs_parameter_count(name):
    cfg = cfg_of(**(ALL if name == "all" else SWITCHES[name]))
    assert count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))) == expected_count(cfg)


def test_swiglu_has_the_gelu_mlps_weights_at_gpt2_width():
    gpt2, swiglu = ModelConfig(), ModelConfig(mlp="swiglu")
    assert swiglu.mlp_hidden == 2048 and 3 * 768 * swiglu.mlp_hidden == 2 * 768 * gpt2.mlp_hidden
    assert matmul_flops_per_token(swiglu) == matmul_flops_per_token(gpt2)
    gqa = ModelConfig(n_kv_heads=4)  # k and v shrink to a third of their columns
    assert matmul_flops_per_token(gpt2) - matmul_flops_per_token(gqa) == 6 * 12 * 768 * 2 * (768 - 256)


@pytest.mark.parametrize("init_scheme", ["gpt2", "pytorch"])
def test_zero_initialised_projections_start_at_zero(init_scheme):
    params = init_params(cfg_of(zero_init_proj=True, init_scheme=init_scheme), jax.random.key(0))
    for layer in ("h_0", "h_1"):
        for proj in (params[layer]["attn"]["c_proj"], params[layer]["mlp"]["c_proj"]):
            assert not np.asarray(proj["kernel"]).any() and not np.asarray(proj["bias"]).any()
    assert np.asarray(params["h_0"]["mlp"]["c_fc"]["kernel"]).std() > 0


def test_fused_attention_equals_the_explicit_one_with_rotary_qk_norm_and_grouped_heads():
    cfg = cfg_of(position="rope", qk_norm=True, n_kv_heads=2)
    params, tokens = noisy_params(cfg), jnp.asarray(TOKENS)

    def loss(cfg, params):
        logits = forward(cfg, params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    fused_cfg = dataclasses.replace(cfg, attention="xla")
    (explicit, explicit_grads), (fused, fused_grads) = (
        jax.value_and_grad(functools.partial(loss, c))(params) for c in (cfg, fused_cfg))
    np.testing.assert_allclose(fused, explicit, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(fused_grads), jax.tree_util.tree_leaves(explicit_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


DECODED = {"rope": dict(position="rope"), "gqa": dict(n_kv_heads=2), "all": ALL}


@pytest.mark.parametrize("name", DECODED)
def test_decoding_through_the_cache_equals_recomputing_the_context(name):
    cfg = cfg_of(**DECODED[name])
    params = noisy_params(cfg)
    assert init_cache(cfg, 2)[0].k.shape == (2, cfg.n_kv_heads or cfg.n_heads, 16, 8)  # grouped heads: a smaller cache
    tokens = jnp.asarray(TOKENS)
    cache, chunks = init_cache(cfg, 2), []
    for start, stop in ((0, 5), (5, 6), (6, 12)):  # a prompt, one token, then several at once
        logits, cache = jax.jit(GPT(cfg, BACKEND).apply)({"params": params}, tokens[:, start:stop], cache=cache,
                                                         cache_index=start)
        chunks.append(logits)
    whole = jax.jit(lambda ids: forward(cfg, params, ids))
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), whole(tokens), atol=1e-5)

    prompt = [int(t) for t in TOKENS[0, :4]]
    generated, _ = Generator(cfg, params, SamplingSettings(max_new_tokens=8, stop_token=None), BACKEND).generate(
        prompt, jax.random.key(0))
    context = list(prompt)  # padded to one length, one program: what follows the context never reaches its logits
    for _ in range(8):  # greedy, recomputing the whole context for every token
        padded = jnp.asarray([context + [0] * (12 - len(context))])
        context.append(int(jnp.argmax(whole(padded)[0, len(context) - 1])))
    assert generated[0] == context[4:]


def test_rows_at_their_own_positions_under_vmap():
    """The serving loop's call: jax.vmap over cache rows, each with its own scalar cache_index."""
    cfg = cfg_of(**ALL)
    params, model = noisy_params(cfg), GPT(cfg, BACKEND)

    def one_row(tokens, cache, index):
        cache = [KVCache(c.k[None], c.v[None]) for c in cache]
        logits, cache = model.apply({"params": params}, tokens[None], cache=cache, cache_index=index)
        return logits[0], [KVCache(c.k[0], c.v[0]) for c in cache]

    lengths = (5, 3)
    rows = []
    for row, n in enumerate(lengths):  # each row's prompt alone, into its own cache
        _, cache = jax.jit(one_row)(jnp.asarray(TOKENS[row, :n]), [KVCache(c.k[0], c.v[0])
                                                                   for c in init_cache(cfg, 1)], 0)
        rows.append(cache)
    caches = jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
    next_tokens = jnp.asarray([TOKENS[row, n] for row, n in enumerate(lengths)])[:, None]
    logits, _ = jax.jit(jax.vmap(one_row))(next_tokens, caches, jnp.asarray(lengths))
    for row, n in enumerate(lengths):
        full = forward(cfg, params, jnp.asarray(TOKENS[row:row + 1, :n + 1]))
        np.testing.assert_allclose(logits[row, -1], full[0, -1], atol=1e-5)


@pytest.mark.parametrize("overrides, line", [
    (dict(n_heads=4, n_kv_heads=3), "--config.model.n_heads=4 is not a multiple of --config.model.n_kv_heads=3"),
    (dict(emb_dim=30, n_heads=2, position="rope"), "--config.model.position=rope rotates pairs of dimensions, and "
     "--config.model.emb_dim=30 / --config.model.n_heads=2 gives an odd head dimension"),
    (dict(mlp="geglu"), "--config.model.mlp='geglu' is invalid: use gelu or relu2 or swiglu"),
    (dict(logit_softcap=-1.0), "--config.model.logit_softcap=-1.0 must be >= 0"),
])
def test_a_bad_combination_is_one_line_naming_the_keys(overrides, line):
    c = tiny.get_config()
    c.model.update(overrides)
    with pytest.raises(UserError, match="^" + re.escape(line)):
        validate(c)


def test_pretrained_weights_have_no_rotary_table_to_start_from():
    c = tiny.get_config()
    c.init_from, c.model.position, c.model.norm = "gpt2_124m", "rope", "rmsnorm"
    with pytest.raises(UserError, match=re.escape(
            "GPT-2's weights, which have no model.position='rope', model.norm='rmsnorm'")):
        validate(c)


def test_a_mesh_must_divide_the_key_value_heads():
    with pytest.raises(UserError, match=r"--config.model.n_kv_heads=2 is not divisible by --config.mesh.tensor=4"):
        sharding.check_fits(ModelConfig(n_kv_heads=2, vocab_multiple=128), Shape(data=1, fsdp=1, tensor=4), 8, "rows")


def test_export_names_every_setting_gpt2_lacks(tmp_path):
    cfg = cfg_of(position="rope", mlp="relu2", n_kv_heads=2)
    with pytest.raises(UserError, match=r"^transformers' GPT-2 has no model.position='rope', model.mlp='relu2', "
                                        r"model.n_kv_heads=2; export writes GPT-2-shaped models only"):
        export(tmp_path / "out", cfg, {}, tiny.get_config())
    assert not (tmp_path / "out").exists()
    # Switches that leave the model GPT-2-shaped (an init, as many key/value heads as heads) are no obstacle.
    assert gpt2_shaped(cfg_of(zero_init_proj=True, n_kv_heads=4)) == BASE


MESHES = [(1, 4, 1), (1, 2, 2)]  # (data, fsdp, tensor): FSDP, and FSDP with tensor (test_sharding adds data)


def modern_sharded_steps() -> dict:
    """Two Muon steps of a model with every switch on (dropout too), on one device and on each mesh of MESHES, made
    and run as the trainer does; run in a child with 4 CPU devices."""
    from mygpt_jax import steps

    cfg = dataclasses.replace(BASE, **ALL, drop_rate=0.1)
    t = tiny.get_config().train
    t.optimizer, t.warmup_steps, t.grad_clip = "muon", 1, 1.0
    tx = steps.create_optimizer(t, total_steps=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 4000).astype(np.uint16)
    starts = np.arange(8).reshape(2, 4) * 20  # 2 micro-batches of 4 windows

    def two_steps(mesh):
        losses, state = two_sharded_steps(cfg, tx, mesh, tokens, starts)
        momentum = {jax.tree_util.keystr(path): list(leaf.addressable_shards[0].data.shape)
                    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
                    if "'muon'" in jax.tree_util.keystr(path) and ".mu" in jax.tree_util.keystr(path)}
        return losses, state, momentum

    reference, ref_state, _ = two_steps(sharding.make_mesh(ml_collections.ConfigDict(
        {"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]))
    ref_leaves = jax.tree_util.tree_leaves(jax.device_get(ref_state))
    out = {"devices": jax.device_count(), "single": reference}
    for shape in MESHES:
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape, strict=True))))
        losses, state, momentum = two_steps(mesh)
        leaves = jax.tree_util.tree_leaves(jax.device_get(state))
        out[str(shape)] = {"losses": losses, "momentum": momentum,
                           "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(leaves, ref_leaves, strict=True))}
    return out


@pytest.fixture(scope="module")
def on_four_devices():
    return json_on_devices("tests.test_switches", "modern_sharded_steps")


@pytest.mark.parametrize("shape", [str(s) for s in MESHES])
def test_a_step_with_every_switch_and_muon_on_a_mesh_computes_the_single_device_step(on_four_devices, shape):
    assert_mesh_step_matches(on_four_devices, shape)


def test_muons_momentum_is_split_as_its_parameter(on_four_devices):
    fsdp, tensor = on_four_devices["(1, 4, 1)"]["momentum"], on_four_devices["(1, 2, 2)"]["momentum"]
    c_fc = next(k for k in fsdp if "c_fc" in k)
    q, k = (next(key for key in fsdp if "c_attn" in key and f"['{b}']" in key) for b in "qk")
    assert fsdp[c_fc] == [8, 88] and tensor[c_fc] == [16, 44]  # (embed / fsdp, mlp / tensor): SwiGLU's 88 units
    assert fsdp[q] == [8, 32] and fsdp[k] == [8, 16]  # the q and k blocks: 4 and 2 heads of 8
    assert tensor[q] == [16, 16] and tensor[k] == [16, 8]
