"""A tiny GPT-2 in OpenAI's exact checkpoint layout, written with TensorFlow, and an independent NumPy
forward pass that reads its variables straight from the checkpoint (the reference for the converter)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

import mygpt_jax
from mygpt_jax.pretrained.download import FILENAMES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402  (after silencing its C++ logging)

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
    rng = np.random.default_rng(seed)
    return {name: ((1.0 if name.endswith("/g") else 0.0) + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in shapes.items()}


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

    def w(name: str) -> np.ndarray:
        return tf.train.load_variable(prefix, f"model/{name}").astype(np.float64)

    def layer_norm(x: np.ndarray, name: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w(f"{name}/g") + w(f"{name}/b")

    def conv1d(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w(f"{name}/w")[0] + w(f"{name}/b")

    def gelu(x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    b, t = tokens.shape
    heads, d = hparams["n_head"], hparams["n_embd"]
    causal = np.tril(np.ones((t, t), bool))
    x = w("wte")[tokens] + w("wpe")[:t]
    for i in range(hparams["n_layer"]):
        qkv = conv1d(layer_norm(x, f"h{i}/ln_1"), f"h{i}/attn/c_attn")
        q, k, v = (a.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + conv1d((probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d), f"h{i}/attn/c_proj")
        x = x + conv1d(gelu(conv1d(layer_norm(x, f"h{i}/ln_2"), f"h{i}/mlp/c_fc")), f"h{i}/mlp/c_proj")
    return layer_norm(x, "ln_f") @ w("wte").T
