"""An independent GPT-2 in NumPy (float64), the reference for the converters and the export, and the Hugging Face
Hub's layout written out by hand: the forward pass reads each weight by its name in a checkpoint's own format
(OpenAI's TensorFlow variables: tests/openai_checkpoint.py; the Hub's safetensors: `hub_weights`), never through
this project's model or converters."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# weights(module, kind): module "wte", "wpe" (tables), "head" (the output matrix, vocab x width), "ln_f",
# "h{i}/ln_1", "h{i}/attn/c_attn", "h{i}/attn/c_proj", "h{i}/ln_2", "h{i}/mlp/c_fc", "h{i}/mlp/c_proj";
# kind "w" (a table, a LayerNorm gain, or a dense layer's (in, out) matrix) or "b" (a bias).
Weights = Callable[[str, str], np.ndarray]


def logits(weights: Weights, tokens: np.ndarray, n_head: int, n_layer: int) -> np.ndarray:
    """GPT-2's logits for `tokens` (batch, time)."""

    def w(module: str, kind: str = "w") -> np.ndarray:
        return np.asarray(weights(module, kind), np.float64)

    def layer_norm(x: np.ndarray, module: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w(module) + w(module, "b")

    def dense(x: np.ndarray, module: str) -> np.ndarray:
        return x @ w(module) + w(module, "b")

    def gelu(x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    b, t = tokens.shape
    x = w("wte")[tokens] + w("wpe")[:t]
    d = x.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(n_layer):
        qkv = dense(layer_norm(x, f"h{i}/ln_1"), f"h{i}/attn/c_attn")
        q, k, v = (a.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // n_head), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + dense((probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d), f"h{i}/attn/c_proj")
        x = x + dense(gelu(dense(layer_norm(x, f"h{i}/ln_2"), f"h{i}/mlp/c_fc")), f"h{i}/mlp/c_proj")
    return layer_norm(x, "ln_f") @ w("head").T


def hub_weights(tensors: dict[str, np.ndarray]) -> Weights:
    """The weights by their Hub names (an optional `transformer.` prefix): h.0.ln_1.weight / .bias, Conv1D weights
    h.0.attn.c_attn.weight stored (in, out), and the head lm_head.weight (an nn.Linear, vocab x width) or, tied,
    wte.weight."""
    named = {name.removeprefix("transformer."): value for name, value in tensors.items()}

    def weights(module: str, kind: str) -> np.ndarray:
        if module == "head":
            return named.get("lm_head.weight", named["wte.weight"])
        name = re.sub(r"^h(\d+)/", r"h.\1.", module).replace("/", ".")
        return named[f"{name}.{'weight' if kind == 'w' else 'bias'}"]

    return weights


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, is_gain: Callable[[str], bool]) -> dict:
    """Random float32 values of `shapes`: around 1 for the LayerNorm gains, around 0 for the rest."""
    rng = np.random.default_rng(seed)
    return {name: ((1.0 if is_gain(name) else 0.0) + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in shapes.items()}


def hub_tensors(arch: dict, seed: int = 0, *, prefix: str = "", untied: bool = False) -> dict[str, np.ndarray]:
    """Random values for every tensor of a GPT2LMHeadModel of `arch` (config.json's vocab_size, n_positions,
    n_embd, n_layer), named as transformers saves them, with the causal-mask buffers older versions saved."""
    v, t, d = arch["vocab_size"], arch["n_positions"], arch["n_embd"]
    shapes = {"wte.weight": (v, d), "wpe.weight": (t, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(arch["n_layer"]):
        shapes |= {f"h.{i}.{name}": shape for name, shape in {
            "ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,),
        }.items()}
    tensors = {prefix + name: value for name, value in
               random_weights(shapes, seed, lambda name: ".ln_" in f".{name}" and name.endswith("weight")).items()}
    for i in range(arch["n_layer"]):
        tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((t, t), np.float32))[None, None]
        tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    if untied:
        tensors["lm_head.weight"] = random_weights({"head": (v, d)}, seed + 1, lambda _: False)["head"]
    return tensors


def write_hub_folder(folder: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    """A folder as save_pretrained writes it: config.json (model_type gpt2 and `config`) and model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                    **config}))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
