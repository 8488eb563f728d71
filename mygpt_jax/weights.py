"""Where a command's weights come from: pretrained GPT-2 (`config.pretrained`) or a training run's checkpoint."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import ml_collections

from mygpt_jax import checkpoint, sharding
from mygpt_jax.config import run_folder
from mygpt_jax.errors import UserError
from mygpt_jax.model import ModelConfig, init_params, logical_axes, pad_vocab


def _for_inference(cfg: ModelConfig, config: ml_collections.ConfigDict) -> ModelConfig:
    """The weights' architecture, run without dropout in the command's compute dtype and attention."""
    return dataclasses.replace(cfg, drop_rate=0.0, dtype=config.model.dtype, attention=config.model.attention)


def load_model(config: ml_collections.ConfigDict, mesh: Any = None) -> tuple[ModelConfig, Any]:
    """(model config for inference, params); the architecture comes from the weights, not the config file. With a
    `mesh`, the params are laid out on it by their logical axis names, whatever mesh a checkpoint was saved on."""
    if config.pretrained:
        from mygpt_jax.pretrained.load import load_pretrained  # TensorFlow only on a first conversion

        cfg, params = load_pretrained(config, config.pretrained)
        cfg = dataclasses.replace(_for_inference(cfg, config), vocab_multiple=config.model.vocab_multiple)
        params = pad_vocab(cfg, params)
        if mesh is not None:
            params = sharding.put(params, sharding.logical_shardings(logical_axes(cfg), mesh))
        return cfg, params

    directory = run_folder(config)
    start = time.time()

    def abstract_for(meta: dict) -> Any:  # the params' shapes (and layout on the mesh) of a checkpoint's model
        cfg = _for_inference(ModelConfig.from_config(ml_collections.ConfigDict(meta["config"]).model), config)
        abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        if mesh is not None:
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                    sharding.logical_shardings(logical_axes(cfg), mesh))
        return abstract

    try:
        step, meta, params = checkpoint.read_newest(directory, abstract_for, lambda line: print(line, file=sys.stderr))
    except checkpoint.NoCheckpoint:
        from mygpt_jax.cli import config_path

        raise UserError(f"no checkpoint in {directory}; create it with: python -m mygpt_jax.train --config "
                        f"{config_path()}" + (f" --config.run_name={config.run_name}"
                                              if config.run_name not in config_path() else "")) from None
    cfg = _for_inference(ModelConfig.from_config(ml_collections.ConfigDict(meta["config"]).model), config)
    print(f"loaded {directory} (update {step}) in {time.time() - start:.1f} s", file=sys.stderr)
    return cfg, params
