"""A tiny GPT-2 in OpenAI's exact checkpoint layout, written with TensorFlow, and the NumPy forward pass
(tests/numpy_gpt2.py) reading its variables straight from the checkpoint (the reference for the converter)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

import mygpt_jax
from mygpt_jax.pretrained.download import FILENAMES
from tests.numpy_gpt2 import logits, random_weights

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # after silencing its C++ logging

tf.get_logger().setLevel("ERROR")  # the Saver's deprecation warning

ASSETS = Path(mygpt_jax.__file__).parent / "assets" / "gpt2"


def openai_variables(hparams: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 values for every variable of OpenAI's GPT-2 checkpoint of these hparams."""
    v, t, d = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"]
    shapes = {"model/wte": (v, d), "model/wpe": (t, d), "model/ln_f/g": (d,), "model/ln_f/b": (d,)}
    for i in range(hparams["n_layer"]):
        shapes |= {f"model/h{i}/{name}": shape for name, shape in {
            "ln_1/g": (d,), "ln_1/b": (d,),
            "attn/c_attn/w": (1, d, 3 * d), "attn/c_attn/b": (3 * d,),
            "attn/c_proj/w": (1, d, d), "attn/c_proj/b": (d,),
            "ln_2/g": (d,), "ln_2/b": (d,),
            "mlp/c_fc/w": (1, d, 4 * d), "mlp/c_fc/b": (4 * d,),
            "mlp/c_proj/w": (1, 4 * d, d), "mlp/c_proj/b": (d,),
        }.items()}
    return random_weights(shapes, seed, lambda name: name.endswith("/g"))


def write_checkpoint(folder: Path, variables: dict[str, np.ndarray], hparams: dict) -> Path:
    """The 7 files of an OpenAI model folder, the checkpoint written by TensorFlow's Saver (eager mode)."""
    folder.mkdir(parents=True)
    saver = tf.compat.v1.train.Saver(var_list={name: tf.Variable(value) for name, value in variables.items()},
                                     save_relative_paths=True)
    saver.save(sess=None, save_path=str(folder / "model.ckpt"))
    # Eager mode writes no graph; the converter never reads it, the downloader only needs the file.
    (folder / "model.ckpt.meta").write_bytes(b"MetaGraphDef placeholder")
    (folder / "hparams.json").write_text(json.dumps(hparams))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(ASSETS / name, folder / name)
    assert 'model_checkpoint_path: "model.ckpt"' in (folder / "checkpoint").read_text()  # relative path
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILENAMES)
    return folder


def numpy_gpt2(folder: Path, tokens: np.ndarray, hparams: dict) -> np.ndarray:
    """GPT-2's logits computed in float64 straight from the TensorFlow checkpoint's variables."""
    prefix = str(folder / "model.ckpt")

    def weights(module: str, kind: str) -> np.ndarray:
        if module in ("wte", "wpe", "head"):  # the head is the tied token table
            return tf.train.load_variable(prefix, f"model/{'wte' if module == 'head' else module}")
        leaf = "b" if kind == "b" else "g" if module.rpartition("/")[2].startswith("ln_") else "w"
        value = tf.train.load_variable(prefix, f"model/{module}/{leaf}")
        return value[0] if leaf == "w" else value  # dense layers are width-1 convolutions: (1, in, out)

    return logits(weights, tokens, hparams["n_head"], hparams["n_layer"])
