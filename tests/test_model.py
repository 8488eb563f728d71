import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mygpt_jax import backends, steps
from mygpt_jax.config import base_config
from mygpt_jax.model import GPT, ModelConfig, count_params, init_cache, init_params, matmul_flops_per_token

TINY = ModelConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
SMALL_VOCAB = dataclasses.replace(TINY, vocab_size=512)
BACKEND = backends.current()  # this machine's profile, as the commands use it


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens):
    return GPT(cfg, BACKEND).apply({"params": params}, tokens)[0]


def shape_only_count(**kw) -> int:
    cfg = ModelConfig(**kw)
    return count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


@pytest.mark.parametrize("kw, expected", [
    (dict(context_length=256), 162_419_712),  # the seed configuration
    (dict(context_length=1024), 163_009_536),
    (dict(context_length=1024, qkv_bias=True, tie_embeddings=True), 124_439_808),  # GPT-2 124M
])
def test_parameter_counts(kw, expected):
    assert shape_only_count(**kw) == expected


def test_logits_shape_and_dtype():
    params = init_params(TINY, jax.random.key(0))
    logits, cache = jax.jit(GPT(TINY, BACKEND).apply)({"params": params}, jnp.zeros((3, 7), jnp.int32))
    assert logits.shape == (3, 7, 50257) and logits.dtype == jnp.float32 and cache is None
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_tied_head_has_no_separate_weights():
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    params = init_params(cfg, jax.random.key(0))
    assert "lm_head" not in params and "lm_head" in init_params(TINY, jax.random.key(0))
    tokens = jnp.arange(5)[None]
    logits = forward(cfg, params, tokens)
    params["wte"]["embedding"] = params["wte"]["embedding"] * 2.0  # the head moves with the embedding
    logits2 = forward(cfg, params, tokens)
    assert not np.allclose(logits, logits2)


def test_causality():
    """Changing token t changes no logits before t."""
    params = init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 50257)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 50257)
    a, b = forward(TINY, params, tokens), forward(TINY, params, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_initial_loss_is_near_log_vocab():
    params = init_params(TINY, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(2), (4, 17), 0, 50257)
    loss = jax.jit(lambda p, b: steps.loss_fn(GPT(TINY, BACKEND), p, b, None))(params, batch)
    assert abs(float(loss) - math.log(50257)) < 0.1


def test_tiny_model_overfits_one_batch():
    c = base_config()
    c.train.learning_rate = 1e-2
    model = GPT(SMALL_VOCAB, BACKEND)
    tx = steps.create_optimizer(c.train, 100)
    params = init_params(SMALL_VOCAB, jax.random.key(0))
    state = steps.TrainState(jnp.int32(0), params, tx.init(params))
    step = jax.jit(steps.make_train_step(model, tx, 1))
    batch = jax.random.randint(jax.random.key(3), (2, 17), 0, 512)
    losses = []
    for _ in range(80):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.5 and losses[-1] < 0.2


def test_gradient_accumulation_equals_the_full_batch():
    model = GPT(SMALL_VOCAB, BACKEND)
    tx = optax.sgd(1.0)  # the update is the gradient itself
    params = init_params(SMALL_VOCAB, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(3), (4, 17), 0, 512)
    results = []
    for accum in (1, 2):
        state = steps.TrainState(jnp.int32(0), params, tx.init(params))
        state, metrics = jax.jit(steps.make_train_step(model, tx, accum))(state, batch, jax.random.key(0))
        results.append((state.params, metrics["loss"]))
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0], results[1][0])


def test_dropout_is_active_only_in_training():
    cfg = dataclasses.replace(TINY, drop_rate=0.5)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.arange(8)[None]
    model = GPT(cfg, BACKEND)
    eval_a, eval_b = forward(cfg, params, tokens), forward(cfg, params, tokens)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, _ = jax.jit(lambda p, r: model.apply({"params": p}, tokens, deterministic=False, rngs={"dropout": r}))(
        params, jax.random.key(1))
    assert not np.allclose(eval_a, train_a)


def test_bfloat16_compute_keeps_float32_params_and_trains():
    cfg = dataclasses.replace(SMALL_VOCAB, dtype="bfloat16")
    c = base_config()
    c.train.learning_rate = 3e-3
    tx = steps.create_optimizer(c.train, 100)
    params = init_params(cfg, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    state = steps.TrainState(jnp.int32(0), params, tx.init(params))
    step = jax.jit(steps.make_train_step(GPT(cfg, BACKEND), tx, 1))
    batch = jax.random.randint(jax.random.key(3), (2, 17), 0, 512)
    first = last = None
    for _ in range(30):
        state, metrics = step(state, batch, jax.random.key(0))
        first = first if first is not None else float(metrics["loss"])
        last = float(metrics["loss"])
    assert last < first - 3.0


def test_flop_count_matches_a_hand_count():
    cfg = ModelConfig(vocab_size=10, context_length=4, emb_dim=2, n_heads=1, n_layers=1)
    # matmul weights: qkv 2x6 + out 2x2 + fc 2x8 + proj 8x2 = 48, head 2x10 = 20 -> 6 x 68 = 408
    # attention: 12 x L x d x T = 12 x 1 x 2 x 4 = 96
    assert matmul_flops_per_token(cfg) == 408 + 96
    assert matmul_flops_per_token(cfg, seq_len=2) == 408 + 48


def test_decoding_in_chunks_through_the_cache_equals_one_forward_pass():
    params = init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 50257)
    full = forward(TINY, params, tokens)
    cache, chunks = init_cache(TINY, 2), []
    for start, stop in ((0, 5), (5, 6), (6, 12)):  # a prompt, one token, then several at once
        logits, cache = jax.jit(GPT(TINY, BACKEND).apply)({"params": params}, tokens[:, start:stop], cache=cache,
                                                 cache_index=start)
        chunks.append(logits)
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-5)


def test_fused_attention_has_the_explicit_attentions_values_and_gradients():
    """attention="xla" (jax.nn.dot_product_attention, the call the GPU's "cudnn" path makes) computes what the
    written-out attention does; decoding through the KV cache stays on the written-out path."""
    fused = dataclasses.replace(SMALL_VOCAB, attention="xla")
    params = init_params(SMALL_VOCAB, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 512)

    def loss(cfg, params):
        logits = forward(cfg, params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    (loss_explicit, grads_explicit), (loss_fused, grads_fused) = (
        jax.value_and_grad(functools.partial(loss, cfg))(params) for cfg in (SMALL_VOCAB, fused))
    np.testing.assert_allclose(loss_fused, loss_explicit, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_fused), jax.tree_util.tree_leaves(grads_explicit), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    _, cache = jax.jit(GPT(fused, BACKEND).apply)({"params": params}, tokens[:, :4], cache=init_cache(fused, 2))
    assert jnp.abs(cache[0].k[:, :, :4]).sum() > 0  # the prompt's keys were written


def test_model_config_from_an_older_checkpoint_gets_the_new_keys_defaults():
    saved = base_config().model.to_dict()
    saved["dtype"] = "float32"
    del saved["attention"]  # checkpoints saved before the key existed
    assert ModelConfig.from_config(ml_collections.ConfigDict(saved)).attention == "explicit"


def test_a_padded_vocabulary_never_predicts_its_padding_rows():
    cfg = dataclasses.replace(TINY, vocab_multiple=128)  # 50304 rows, nanoGPT's
    assert cfg.padded_vocab == 50304 and ModelConfig().padded_vocab == 50257
    params = init_params(cfg, jax.random.key(0))
    assert params["wte"]["embedding"].shape == (50304, 32) and params["lm_head"]["kernel"].shape == (32, 50304)
    assert shape_only_count(context_length=256, vocab_multiple=128) == 162_419_712 + 2 * 47 * 768
    tokens = jnp.arange(9)[None] * 5000
    logits = forward(cfg, params, tokens)
    assert logits.shape == (1, 9, 50304) and bool(jnp.all(logits[..., 50257:] == -jnp.inf))
    # The loss is the softmax over the real rows alone: the unpadded model with the same weights gives it.
    batch = jnp.concatenate([tokens, tokens[:, :1]], axis=1)
    real = dict(params, wte={"embedding": params["wte"]["embedding"][:50257]},
                lm_head={"kernel": params["lm_head"]["kernel"][:, :50257]})
    padded_loss = steps.loss_fn(GPT(cfg, BACKEND), params, batch, None)
    real_loss = steps.loss_fn(GPT(TINY, BACKEND), real, batch, None)
    np.testing.assert_allclose(padded_loss, real_loss, rtol=1e-6)
    grads = jax.grad(lambda p: steps.loss_fn(GPT(cfg, BACKEND), p, batch, None))(params)
    assert np.isfinite(np.asarray(grads["lm_head"]["kernel"])).all()
    assert not np.asarray(grads["lm_head"]["kernel"][:, 50257:]).any()  # the padding learns nothing


def test_pretrained_weights_are_padded_with_zero_rows():
    from mygpt_jax.model import pad_vocab

    cfg = dataclasses.replace(TINY, vocab_multiple=64)
    params = init_params(TINY, jax.random.key(0))
    padded = pad_vocab(cfg, params)
    assert padded["wte"]["embedding"].shape == (50304, 32) and padded["lm_head"]["kernel"].shape == (32, 50304)
    np.testing.assert_array_equal(padded["wte"]["embedding"][:50257], params["wte"]["embedding"])
    assert not np.asarray(padded["wte"]["embedding"][50257:]).any()
    tokens = jnp.arange(7)[None] * 7000
    np.testing.assert_allclose(forward(cfg, padded, tokens)[..., :50257], forward(TINY, params, tokens), atol=1e-6)
