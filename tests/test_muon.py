"""train.optimizer="muon": which leaf gets which update, one shape convention on every optax line, exact resume.

Run on the jax 0.5.0 line too (`.ci/jax050 tests/test_muon.py`): optax 0.2.5 and 0.2.8 place Muon's shape factor
differently (mygpt_jax/compat.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mygpt_jax import muon, steps
from mygpt_jax.config import base_config
from mygpt_jax.model import ModelConfig, init_params
from tests.utils import read_metrics, run_cli

COEFFS = (3.4445, -4.7750, 2.0315)


def muon_train(**keys) -> object:
    t = base_config().train
    t.optimizer, t.weight_decay_params = "muon", "matrices"
    t.update(keys)
    return t


def numpy_muon(grads: list[np.ndarray], lr: float, beta: float = 0.95, steps_: int = 5) -> np.ndarray:
    """The last of Muon's updates of a (fan_in, fan_out) matrix for these gradients, in float64: Nesterov momentum
    (bias-corrected as optax does), the quintic Newton-Schulz iteration on the Frobenius-normalised matrix (its wide
    orientation), times sqrt(max(1, fan_out / fan_in)) and -lr."""
    mu = np.zeros_like(grads[0], np.float64)
    for count, g in enumerate(grads, start=1):
        mu = beta * mu + (1 - beta) * g
        x = beta * mu / (1 - beta ** (count + 1)) + (1 - beta) * g / (1 - beta ** count)
    wide = x.T if x.shape[0] > x.shape[1] else x
    wide = wide / (np.linalg.norm(wide) + 1e-8)
    a, b, c = COEFFS
    for _ in range(steps_):
        gram = wide @ wide.T
        wide = a * wide + (b * gram + c * gram @ gram) @ wide
    x = wide.T if x.shape[0] > x.shape[1] else wide
    return -lr * np.sqrt(max(1.0, x.shape[1] / x.shape[0])) * x


def updates_of(tx: optax.GradientTransformation, params, grads: list) -> object:
    """The updates of the last of these gradients, from a fresh state (one compiled program)."""
    def run(params, grads):
        state, updates = tx.init(params), None
        for g in grads:
            updates, state = tx.update(g, state, params)
        return updates

    return jax.jit(run)(params, grads)


def test_a_wide_matrix_gets_the_same_update_on_every_optax_line():
    """A (d, 3d) hidden kernel: the documented convention (factor sqrt(3)) whichever optax places it."""
    d = 16
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((d, 3 * d)).astype(np.float32) for _ in range(2)]
    tree = lambda x: {"h_0": {"mlp": {"c_fc": {"kernel": x}}}}  # noqa: E731 - a hidden matrix by its path
    tx = steps.create_optimizer(muon_train(muon_learning_rate=0.02), 10)
    got = updates_of(tx, tree(jnp.zeros((d, 3 * d))), [tree(jnp.asarray(g)) for g in grads])
    np.testing.assert_allclose(got["h_0"]["mlp"]["c_fc"]["kernel"], numpy_muon(grads, 0.02), atol=2e-5)


def test_hidden_matrices_get_optaxs_muon_and_every_other_leaf_adamw():
    cfg = ModelConfig(vocab_size=300, context_length=8, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=1, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2)
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params) for k in keys]
    t = muon_train(muon_learning_rate=0.03, learning_rate=1e-3, weight_decay=0.1)
    got = updates_of(steps.create_optimizer(t, 10), params, grads)
    labels = muon.labels(params)

    adamw = updates_of(optax.adamw(1e-3, b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=0.1,
                                   mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)), params, grads)

    def optax_muon(g: list) -> jax.Array:  # optax's own muon() on one matrix (every 2-D leaf is Muon's there)
        return updates_of(optax.contrib.muon(0.03, ns_coeffs=COEFFS, weight_decay=0.0), {"w": g[0]},
                          [{"w": x} for x in g])["w"]

    names = []
    for (path, update), label, want_adamw in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                                jax.tree.leaves(labels), jax.tree.leaves(adamw), strict=True):
        name = jax.tree_util.keystr(path)
        if label == "adamw":
            np.testing.assert_allclose(update, want_adamw, rtol=1e-5, atol=1e-8, err_msg=name)
            continue
        names.append(name)
        blocks = (32, 16, 16) if "c_attn" in name else (update.shape[1],)  # q, k, v apart: 4 and 2 heads of 8
        bounds = np.cumsum(blocks)[:-1]
        want = np.concatenate([optax_muon([np.split(g_path, bounds, axis=1)[i] for g_path in (
            _leaf(g, path) for g in grads)]) for i in range(len(blocks))], axis=1)
        np.testing.assert_allclose(update, want, atol=2e-6, err_msg=name)
    assert sorted(names) == [f"['h_0']['{m}']['{d}']['kernel']" for m, d in
                             (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))]


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)


def test_both_groups_follow_the_warmup_and_cosine_schedule():
    t = muon_train(muon_learning_rate=0.02, learning_rate=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    params = {"h_0": {"mlp": {"c_fc": {"kernel": jnp.zeros((8, 8))}}}, "wte": {"embedding": jnp.zeros((8, 8))}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx, sizes = steps.create_optimizer(t, 20), []
    state = tx.init(params)
    for _ in range(20):
        updates, state = tx.update(grads, state, params)
        sizes.append([float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)])
    adam_schedule, muon_schedule = (steps.learning_rate(t, 20, peak) for peak in (1e-3, 0.02))
    sizes = np.array(sizes)  # constant gradients: each group's step is its learning rate times a constant
    for group, schedule in ((0, muon_schedule), (1, adam_schedule)):
        ratio = sizes[:, group] / np.array([schedule(i) for i in range(20)])
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)


@pytest.mark.parametrize("key, value, line", [
    ("optimizer", "sgd", "--config.train.optimizer='sgd' is invalid: use adamw or muon"),
    ("muon_ns_steps", 0, "--config.train.muon_ns_steps=0 must be >= 1"),
])
def test_bad_muon_keys_are_one_line(key, value, line):
    from mygpt_jax.config import validate
    from mygpt_jax.errors import UserError

    c = base_config()
    c.train[key] = value
    with pytest.raises(UserError) as e:
        validate(c)
    assert str(e.value) == line


def test_resuming_a_muon_run_gives_the_uninterrupted_losses(tmp_path):
    # A constant learning rate: stopping early by max_steps would move the cosine's end.
    run = ["--config.train.optimizer=muon", "--config.model.n_kv_heads=1", "--config.model.position=rope",
           "--config.train.eval_freq=4", "--config.sample.prompt=", "--config.train.flops_matmul_size=0",
           "--config.data.sampling=random", "--config.train.max_steps=12"]
    whole = run_cli("train", f"--config.checkpoint_dir={tmp_path / 'whole'}", *run)
    assert whole.returncode == 0, whole.stderr
    first = run_cli("train", f"--config.checkpoint_dir={tmp_path / 'parts'}", *run, "--config.train.checkpoint_every=6",
                    "--config.train.max_steps=6")
    assert first.returncode == 0, first.stderr
    second = run_cli("train", f"--config.checkpoint_dir={tmp_path / 'parts'}", *run)
    assert second.returncode == 0, second.stderr
    assert "Resuming" in second.stdout
    whole, parts = ({r["update"]: (r["train_loss"], r["val_loss"]) for r in read_metrics(d / "tiny")}
                    for d in (tmp_path / "whole", tmp_path / "parts"))
    assert max(whole) == 12 and whole == {update: parts[update] for update in whole}  # parts adds update 6's


def test_a_config_without_the_optimizer_key_is_adamw():
    """A train section saved before the key existed gets today's optimizer."""
    t = base_config().train.to_dict()
    del t["optimizer"]
    tx = steps.create_optimizer(ml_collections.ConfigDict(t), 10)
    assert not isinstance(tx.init({"w": jnp.zeros((2, 2))}), optax.MultiTransformState)
