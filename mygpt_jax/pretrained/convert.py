"""Convert OpenAI's GPT-2 TensorFlow checkpoint into this project's Flax parameter tree.

The Flax names mirror OpenAI's, so converting is a rename (`model/h3/attn/c_attn/w` becomes
`h_3/attn/c_attn/kernel`) plus dropping the leading 1 of the conv1d weights (OpenAI stores the dense
layers as width-1 convolutions: (1, in, out)).  The expected variables and shapes are derived from
the model itself (`jax.eval_shape` of `init_params`), so every checkpoint variable must be used and
every parameter filled, or the conversion fails with a UserError naming the variable.

TensorFlow is imported inside `convert_checkpoint` only: it takes many seconds to import and is
needed for nothing else (a converted checkpoint is cached as Orbax by `mygpt_jax.pretrained.load`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mygpt_jax.config import GPT2_SIZES
from mygpt_jax.errors import UserError
from mygpt_jax.model import ModelConfig, init_params
from mygpt_jax.tokenizer import VOCAB_SIZE

HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
_LEAF_NAMES = {"kernel": "w", "bias": "b", "scale": "g"}  # Flax leaf -> OpenAI leaf
_MAX_NAMED = 3  # names in one error message


def model_label(cfg: ModelConfig) -> str:
    """What the weights are, by their shape: "GPT-2 124M" for one of OpenAI's sizes, else the shape itself (an
    export of a run, a model fine-tuned elsewhere), whatever name the config asked for."""
    for size, shape in GPT2_SIZES.items():
        if (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.context_length, cfg.vocab_size) == (*shape, 1024, VOCAB_SIZE):
            return f"GPT-2 {size}"
    return (f"a model of {cfg.n_layers} layers of {cfg.emb_dim}, {cfg.n_heads} heads, context {cfg.context_length} "
            "(none of OpenAI's GPT-2 sizes)")


class DamagedWeights(UserError):
    """A weights file that is there but cannot be read; `weights_remedy` adds what to do, which depends on whose
    folder it is (`path`: what to delete for the download cache to fetch it again)."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = path


@contextlib.contextmanager
def weights_remedy(downloaded: bool) -> Iterator[None]:
    """Turn a DamagedWeights raised inside into one line with the remedy: the download cache's files are deleted to
    be downloaded again; a user's own weights_dir (which nothing downloads into) is only ever to be replaced."""
    try:
        yield
    except DamagedWeights as e:
        remedy = (f"delete {e.path} so that it is downloaded again" if downloaded else
                  "replace it with a whole copy, or point --config.weights_dir at another folder")
        raise UserError(f"{e}; {remedy}") from e


def read_json_object(path: Path, holds: str) -> dict[str, Any]:
    """The JSON object in `path`, else a UserError (`holds`: what the folder must hold, for a missing file)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the folder must hold {holds}") from None
    except (OSError, ValueError) as e:
        raise DamagedWeights(f"{path} could not be read ({e})", path) from e
    if not isinstance(value, dict):
        raise DamagedWeights(f"{path} is not a JSON object", path)
    return value


def read_hparams(folder: str | os.PathLike) -> dict[str, int]:
    """The architecture in `folder/hparams.json`: n_vocab, n_ctx, n_embd, n_head, n_layer."""
    path = Path(folder) / "hparams.json"
    hparams = read_json_object(path, "OpenAI's GPT-2 files")
    bad = [k for k in HPARAMS_KEYS if not (type(hparams.get(k)) is int and hparams[k] > 0)]
    if bad:
        raise DamagedWeights(f"{path} lacks positive integers for {', '.join(bad)}", path)
    if hparams["n_embd"] % hparams["n_head"]:
        raise UserError(f"{path}: n_embd={hparams['n_embd']} is not divisible by n_head={hparams['n_head']}")
    return {k: hparams[k] for k in HPARAMS_KEYS}


def model_config_from_hparams(hparams: dict[str, int], *, drop_rate: float = 0.0,
                              dtype: str = "float32") -> ModelConfig:
    """GPT-2's architecture: biases on q/k/v and an LM head tied to the token embedding."""
    return ModelConfig(vocab_size=hparams["n_vocab"], context_length=hparams["n_ctx"],
                       emb_dim=hparams["n_embd"], n_heads=hparams["n_head"], n_layers=hparams["n_layer"],
                       drop_rate=drop_rate, qkv_bias=True, tie_embeddings=True, dtype=dtype)


def openai_name(path: tuple[str, ...]) -> str:
    """OpenAI's name of the Flax parameter at `path`: ("h_0", "ln_1", "scale") -> "model/h0/ln_1/g"."""
    *modules, leaf = path
    if leaf == "embedding":  # wte/embedding -> model/wte
        leaf = modules.pop()
    modules = [re.sub(r"^h_(\d+)$", r"h\1", m) for m in modules]
    return "/".join(["model", *modules, _LEAF_NAMES.get(leaf, leaf)])


def parameter_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax path: shape} of every parameter of `cfg` (derived from the model, nothing allocated)."""
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract).items()}


def expected_variables(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{OpenAI variable name: (Flax path, shape in the checkpoint)} of every parameter of `cfg`."""
    return {openai_name(path): (path, (1, *shape) if path[-1] == "kernel" else shape)  # conv1d weights
            for path, shape in parameter_shapes(cfg).items()}


def convert_checkpoint(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) of the OpenAI checkpoint in `folder`; params are float32 NumPy arrays."""
    cfg = model_config_from_hparams(read_hparams(folder))
    expected = expected_variables(cfg)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # silence TensorFlow's C++ start-up messages
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    prefix = str(Path(folder) / "model.ckpt")  # OpenAI's name, whatever `checkpoint` says: the index load.py hashes
    try:
        found = dict(tf.train.list_variables(prefix))
        check_names(found, expected, "variable", f"TensorFlow checkpoint {prefix}",
                    "is it OpenAI's GPT-2 and does hparams.json match it?")
        flat = {}
        for name, (path, shape) in expected.items():
            if tuple(found[name]) != shape:
                raise UserError(f"variable {name} in {prefix} has shape {tuple(found[name])}, expected {shape} "
                                "(does hparams.json match the checkpoint?)")
            value = np.asarray(tf.train.load_variable(prefix, name), dtype=np.float32)
            flat[path] = value[0] if path[-1] == "kernel" else value
    except (tf.errors.OpError, IndexError) as e:  # IndexError: a truncated data file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedWeights(f"TensorFlow checkpoint {prefix} could not be read ({reason})", folder) from e
    return cfg, traverse_util.unflatten_dict(flat)


def check_names(found: Collection[str], expected: Collection[str], kind: str, where: str, hint: str) -> None:
    """Every name `found` in a checkpoint is `expected` and every expected name is found, else a UserError
    naming the first few: "unexpected <kind> <names> in <where>; <hint>"."""
    for problem, names in (("unexpected", set(found) - set(expected)), ("missing", set(expected) - set(found))):
        if names:
            names = sorted(names)
            more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
            raise UserError(f"{problem} {kind} {', '.join(names[:_MAX_NAMED])}{more} in {where}; {hint}")
