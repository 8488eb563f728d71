"""The pure train step under `jax.sharding`: the groundwork for multi-device training.

Two CPU devices stand in for two accelerators (XLA's host-platform device count, which must be set before jax
starts, hence a subprocess). Parameters are placed by their logical axis names (`model.logical_axes`), and the
sharded step must compute what the single-device step computes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np

from configs import tiny
from mygpt_jax import backends
from mygpt_jax.model import ModelConfig, init_params, logical_axes
from tests.utils import REPO, cli_env

# Logical axis -> mesh axis. Data parallel: parameters replicated, the batch split. Tensor parallel: the MLP's
# hidden units, the attention heads, the fused q/k/v columns (in column ranges, not head by head: correct, with
# more communication) and the vocabulary split. GPT-2's 50257 tokens do not divide evenly: sharding them needs a
# padded vocabulary, as nanoGPT's 50304; the test's model has 512.
MESHES = {"data": ((2, 1), ()),
          "tensor": ((1, 2), (("mlp", "model"), ("heads", "model"), ("qkv", "model"), ("vocab", "model")))}


def tiny_model() -> ModelConfig:
    config = tiny.get_config()
    backends.resolve(config, backends.current())
    return dataclasses.replace(ModelConfig.from_config(config.model), vocab_size=512, n_layers=1)


def sharded_steps() -> dict:
    """Two train steps of the tiny config, on one device and on each mesh of MESHES; run in the child."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mygpt_jax import steps
    from mygpt_jax.model import GPT

    cfg = tiny_model()
    tx = steps.create_optimizer(tiny.get_config().train, total_steps=2)
    train_step = steps.make_train_step(GPT(cfg, backends.current()), tx, grad_accum_steps=1)
    params = init_params(cfg, jax.random.key(0))
    batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, cfg.context_length + 1), dtype=np.int32)
    # Made under jit, the optimizer state lies where the parameters lie.
    new_state = jax.jit(lambda params: steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)))

    def two_steps(params, batch):
        state = new_state(params)
        # The step returns the state placed as it came, as a multi-device trainer would jit it, so the second
        # call runs the first one's program.
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
        step = jax.jit(train_step, out_shardings=(shardings, None))
        losses = []
        for _ in range(2):  # dropout is on: its masks must not depend on how the batch is split
            state, metrics = step(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        return losses, state.params

    ref_losses, ref_params = two_steps(*jax.device_put((params, batch), jax.devices()[0]))
    ref_params = jax.device_get(ref_params)
    out = {"devices": jax.device_count(), "single": ref_losses}
    for name, (shape, rules) in MESHES.items():
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))
        shardings = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)
        losses, new = two_steps(jax.device_put(params, shardings),
                                jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data"))))
        kernel = new["h_0"]["mlp"]["c_fc"]["kernel"]
        out[name] = {"losses": losses, "c_fc_shard_shape": list(kernel.addressable_shards[0].data.shape),
                     "wte_shard_shape": list(new["wte"]["embedding"].addressable_shards[0].data.shape),
                     "max_param_diff": max(float(np.abs(a - b).max()) for a, b in zip(
                         jax.tree_util.tree_leaves(jax.device_get(new)), jax.tree_util.tree_leaves(ref_params)))}
    return out


def test_logical_axes_name_every_dimension_of_every_parameter():
    cfg = tiny_model()
    params, axes = init_params(cfg, jax.random.key(0)), logical_axes(cfg)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert len(flat_params) == len(flat_axes)
    for path, value in flat_params:
        names = flat_axes[path]
        assert len(names) == value.ndim and all(isinstance(n, str) for n in names), (path, names)


def test_the_train_step_sharded_over_two_devices_computes_the_single_device_step():
    env = dict(cli_env(), XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    code = "import json; from tests.test_sharding import sharded_steps; print(json.dumps(sharded_steps()))"
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["single"][1] < out["single"][0]  # it trains
    for name in MESHES:
        np.testing.assert_allclose(out[name]["losses"], out["single"], rtol=1e-5)
        assert out[name]["max_param_diff"] < 1e-5, name
    # The updated parameters keep their placement: whole on each device for data parallel, halves for tensor
    # parallel (an MLP kernel's hidden units, the embedding's vocabulary).
    assert out["data"]["c_fc_shard_shape"] == [32, 128] and out["data"]["wte_shard_shape"] == [512, 32]
    assert out["tensor"]["c_fc_shard_shape"] == [32, 64] and out["tensor"]["wte_shard_shape"] == [256, 32]
