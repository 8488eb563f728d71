"""run_setup: the one chain from a config to a run's state and compiled steps, as train, bench and bench_data
build it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mygpt_jax import backends, run_setup, sharding
from mygpt_jax.config import base_config
from mygpt_jax.errors import UserError
from tests.numpy_gpt2 import hub_tensors, write_hub_folder


def tiny_config():
    from configs.tiny import get_config

    config = get_config()
    backends.resolve(config, backends.current())  # as cli.run does
    return config


def test_a_run_trains_from_its_fresh_state_with_the_compiled_step():
    config = tiny_config()
    run = run_setup.setup(config, total_steps=3)
    state = run.fresh_state(jax.random.key(0))
    assert jax.tree.structure(state) == jax.tree.structure(run.abstract_state())
    batch = jax.device_put(np.zeros((1, 4, 33), np.int32), run.batch_sharding)
    rng = sharding.put(jax.random.key(1), sharding.replicated(run.mesh))
    step, seconds = run.compile_train_step(state, batch, rng)
    state, metrics = step(state, batch, rng)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and seconds > 0


def test_fine_tuning_from_weights_of_another_shape_names_the_keys_to_set(tmp_path):
    """An export (or any folder in weights_dir) of another shape: the keys and values to set, not a config file
    that describes some other GPT-2."""
    arch = {"vocab_size": 50257, "n_positions": 32, "n_embd": 16, "n_head": 2, "n_layer": 1}
    folder = write_hub_folder(tmp_path / "export", hub_tensors(arch), arch)
    config = tiny_config()
    config.init_from, config.weights_dir, config.checkpoint_dir = "gpt2_124m", str(folder), str(tmp_path / "ckpt")
    with pytest.raises(UserError) as error:
        run_setup.setup(config, total_steps=1).fresh_state(jax.random.key(0))
    message = str(error.value)
    assert "does not fit this model" in message and "configs/" not in message, message
    assert "--config.model.emb_dim=16" in message and "--config.model.n_layers=1" in message, message
    assert "--config.model.qkv_bias=True" in message, message


def test_the_base_config_has_the_resume_and_evaluation_keys():
    c = base_config()
    assert (c.train.resume_step, c.eval.all_tokens) == (0, False)
