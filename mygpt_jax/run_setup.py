"""One place that builds a training run's machinery, for `train`, `bench`, `bench_data` and the tests alike: the
mesh, the optimizer and its schedule, the state's and the batch's shardings, the model, a fresh, pretrained
(`init_from`) or restored state made where its shardings say, and the compiled train and evaluation steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mygpt_jax import backends, sharding, steps
from mygpt_jax.checkpoint import Checkpointer, Mismatch
from mygpt_jax.config import MODEL_SHAPE_KEYS, changed_settings
from mygpt_jax.errors import UserError
from mygpt_jax.model import GPT, ModelConfig, init_params, pad_vocab


@dataclasses.dataclass
class Run:
    """A run's model and optimizer laid out on its mesh; `total_steps` sets the learning-rate schedule."""

    config: ml_collections.ConfigDict
    cfg: ModelConfig
    mesh: Any
    model: GPT
    tx: optax.GradientTransformation
    learning_rate: optax.ScalarOrSchedule
    state_shardings: steps.TrainState
    batch_sharding: Any
    total_steps: int

    @property
    def micro_batch(self) -> int:
        return self.config.train.batch_size // self.config.train.grad_accum_steps

    def abstract_state(self) -> steps.TrainState:
        """The state's shapes, dtypes and shardings, nothing allocated."""
        shapes = jax.eval_shape(lambda: steps.new_state(init_params(self.cfg, jax.random.key(0)), self.tx))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.state_shardings)

    def fresh_state(self, rng: jax.Array) -> steps.TrainState:
        """Random weights, or with `init_from` GPT-2's, made where the shardings say (never whole on one device)."""
        if not self.config.init_from:
            return steps.init_state(self.cfg, self.tx, rng, self.state_shardings)
        params = sharding.put(pretrained_params(self.config, self.cfg), self.state_shardings.params)
        return jax.jit(lambda p: steps.new_state(p, self.tx), out_shardings=self.state_shardings)(params)

    def restored_state(self, checkpoints: Checkpointer, saved: dict) -> steps.TrainState:
        """The state of the checkpoint `saved` is the meta of, laid out on this mesh whatever mesh saved it."""
        abstract = self.abstract_state()
        try:
            params, opt_state = checkpoints.restore_state(saved["step"], abstract.params, abstract.opt_state)
        except Mismatch as e:
            changed = changed_settings(saved["config"], self.config, within=("model", "data", "train"))
            if not changed:
                raise
            raise UserError(f"the checkpoint in {checkpoints.run_dir} does not fit settings changed since it was "
                            f"saved ({'; '.join(changed[:3])}); rerun with its settings, or use another "
                            "--config.run_name") from e
        step = sharding.put(jnp.int32(saved["step"]), self.state_shardings.step)
        return steps.TrainState(step, params, opt_state)

    def compile_train_step(self, state: steps.TrainState, batch: jax.Array, rng: jax.Array, profile: bool = False
                           ) -> tuple[Any, float]:
        """(the train step compiled for these arguments, the seconds compiling took)."""
        start = time.perf_counter()
        step = steps.jit_train_step(self.model, self.tx, self.config.train.grad_accum_steps, profile=profile,
                                    state_shardings=self.state_shardings, batch_sharding=self.batch_sharding)
        compiled = step.lower(state, batch, rng).compile()
        return compiled, time.perf_counter() - start

    def eval_step(self) -> Any:
        return steps.jit_eval_step(self.model)


def setup(config: ml_collections.ConfigDict, total_steps: int, backend: Any = None) -> Run:
    """The run `config` describes on its mesh, the schedule reaching its end at `total_steps`."""
    t = config.train
    cfg = ModelConfig.from_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_fits(cfg, mesh, t.batch_size // t.grad_accum_steps,
                        f"--config.train.batch_size={t.batch_size} / train.grad_accum_steps={t.grad_accum_steps}")
    tx = steps.create_optimizer(t, total_steps)
    return Run(config, cfg, mesh, sharding.model_on(mesh, cfg, backend or backends.current()), tx,
               steps.learning_rate(t, total_steps), sharding.state_shardings(cfg, mesh, tx),
               sharding.batch_sharding(mesh), total_steps)


def pretrained_params(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Any:
    """GPT-2's weights (--config.init_from, or an export in --config.weights_dir) for `cfg`: the context
    cropped, the vocabulary padded; weights of another shape are one line naming the keys to set."""
    from mygpt_jax.pretrained.load import load_pretrained  # only fine-tuning needs it

    pretrained_cfg, params = load_pretrained(config, config.init_from)
    fields = [f for f in MODEL_SHAPE_KEYS if f not in ("context_length", "vocab_multiple")]  # cropped, padded
    mismatched = [f for f in fields if getattr(cfg, f) != getattr(pretrained_cfg, f)]
    if cfg.context_length > pretrained_cfg.context_length:
        mismatched.append("context_length")
    if mismatched:
        where = f" (weights_dir {config.weights_dir})" if config.weights_dir else ""
        raise UserError(f"--config.init_from={config.init_from}{where} does not fit this model: "
                        + ", ".join(f"model.{f}={getattr(cfg, f)} (weights: {getattr(pretrained_cfg, f)})"
                                    for f in mismatched)
                        + "; set " + " ".join(f"--config.model.{f}={getattr(pretrained_cfg, f)}" for f in mismatched))
    params["wpe"]["embedding"] = params["wpe"]["embedding"][:cfg.context_length]  # shorter context: crop
    return pad_vocab(cfg, params)
