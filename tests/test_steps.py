"""The optimizer `steps.create_optimizer` builds: its schedule, gradient clipping and which parameters decay, each
checked against arithmetic written out here (NumPy), so that removing a part of the chain fails a test."""

import jax
import jax.numpy as jnp
import numpy as np

from mygpt_jax import steps
from mygpt_jax.config import base_config
from mygpt_jax.model import ModelConfig, init_params

TINY = ModelConfig(vocab_size=512, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def adamw_updates(grads: list[np.ndarray], param: np.ndarray, t, clip: float) -> list[np.ndarray]:
    """AdamW's updates of one parameter for successive gradients at a constant learning rate, each gradient first
    scaled to a global norm of at most `clip` (0: no clipping), as PyTorch and optax define them."""
    m = v = np.zeros_like(param)
    updates = []
    for i, g in enumerate(grads, start=1):
        norm = np.linalg.norm(g)
        if clip and norm > clip:
            g = g * (clip / norm)
        m = t.beta1 * m + (1 - t.beta1) * g
        v = t.beta2 * v + (1 - t.beta2) * g * g
        m_hat, v_hat = m / (1 - t.beta1 ** i), v / (1 - t.beta2 ** i)
        updates.append(-t.learning_rate * (m_hat / (np.sqrt(v_hat) + t.eps) + t.weight_decay * param))
    return updates


def optimizer_updates(t, grads: list[np.ndarray], param: np.ndarray) -> list[np.ndarray]:
    tx = steps.create_optimizer(t, 100)
    params = {"w": jnp.asarray(param)}
    state, updates = tx.init(params), []
    for g in grads:
        update, state = tx.update({"w": jnp.asarray(g)}, state, params)
        updates.append(np.asarray(update["w"]))
    return updates


def test_gradient_clipping_scales_the_gradient_before_adam_sees_it():
    """Adam's first update is about -lr * sign(g) whatever the gradient's scale, so clipping shows in the second:
    a huge first gradient, clipped to norm 1, weighs far less against a small second one than unclipped."""
    t = base_config().train
    t.grad_clip = 1.0
    param = np.ones(3, np.float32)
    grads = [np.full(3, 1e6, np.float32), np.full(3, -0.1, np.float32)]
    got = optimizer_updates(t, grads, param)
    np.testing.assert_allclose(got, adamw_updates(grads, param, t, clip=1.0), rtol=1e-4)
    unclipped = adamw_updates(grads, param, t, clip=0.0)
    assert not np.allclose(got[1], unclipped[1], rtol=1e-2)  # the reference itself tells the two apart

    t.grad_clip = 0.0  # off: the same gradients reach Adam unscaled
    np.testing.assert_allclose(optimizer_updates(t, grads, param), unclipped, rtol=1e-4)


def test_the_warmup_starts_at_learning_rate_over_warmup_steps():
    """The first update moves the weights (a warmup from 0 would waste it), at learning_rate / warmup_steps."""
    t = base_config().train
    t.warmup_steps = 10
    param = np.ones(3, np.float32)
    (first,) = optimizer_updates(t, [np.full(3, 1e6, np.float32)], param)
    np.testing.assert_allclose(first, -t.learning_rate / 10 * (1 + t.weight_decay), rtol=1e-3)


def test_matrices_decay_every_2d_leaf_of_the_real_tree_and_no_1d_leaf():
    """With weight_decay_params="matrices" every 2-D leaf of the model decays, the embeddings included (as nanoGPT
    does), and no bias or LayerNorm parameter; with "all" every leaf does."""
    params = init_params(TINY, jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert {"wte", "wpe"} <= {path[0].key for path, p in leaves if p.ndim == 2}
    assert any(p.ndim == 1 for _, p in leaves)
    for decayed in ("matrices", "all"):
        t = base_config().train
        t.weight_decay_params = decayed
        tx = steps.create_optimizer(t, 100)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)  # decay alone
        for (path, p), update in zip(leaves, jax.tree_util.tree_leaves(updates), strict=True):
            decays = decayed == "all" or p.ndim >= 2
            expected = -t.learning_rate * t.weight_decay * np.asarray(p) if decays else np.zeros(p.shape)
            np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-12, err_msg=f"{decayed} {path}")
