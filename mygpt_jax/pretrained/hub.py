"""The Hugging Face Hub's GPT-2 (transformers' GPT2LMHeadModel): config.json and model.safetensors, both ways.

A Hub tensor's name is this project's parameter path written with dots (`h_3/attn/c_attn/kernel` is
`h.3.attn.c_attn.weight`; kernels, LayerNorm scales and embeddings are all `weight`), under an optional
`transformer.` prefix. transformers' Conv1D stores its weight (in, out) as a Flax kernel does, so the one
other layout is the untied head's, an nn.Linear: (out, in). `tensor_layout` lists an architecture's tensors
once; loading (`load_folder`) and exporting (`to_hub`) both go through it.

GPT2LMHeadModel always has q/k/v biases, and its head is tied unless config.json says otherwise: a model
without q/k/v biases exports zeros, and a folder whose q/k/v biases are all zero loads as a model without
them (it computes the same); an lm_head.weight equal to wte.weight is a tied head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from mygpt_jax.errors import UserError
from mygpt_jax.model import LN_EPS, ModelConfig
from mygpt_jax.pretrained.convert import (
    DamagedWeights,
    check_names,
    model_config_from_hparams,
    parameter_shapes,
    read_json_object,
)
from mygpt_jax.tokenizer import END_OF_TEXT_ID

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
PREFIX, HEAD = "transformer.", "lm_head.weight"
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal masks older transformers saved: no weights
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_ARCHITECTURE = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
# GPT2Config's defaults, which transformers gives the keys a config.json leaves out.
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True}
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # transformers' two names for this model's GELU
# ModelConfig fields that GPT2LMHeadModel expresses, or that change how the model runs or was initialised but not
# what it computes; `vocab_multiple` (the scale-out issue's padded vocabulary) adds rows that exports leave out.
_EXPRESSIBLE = frozenset({"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias",
                          "tie_embeddings", "init_std", "init_scheme", "dtype", "remat", "attention", "vocab_multiple"})


def hub_name(path: tuple[str, ...]) -> str:
    """The Hub's name (without the prefix) of the parameter at `path`: ("h_0", "ln_1", "scale") -> "h.0.ln_1.weight"."""
    *modules, leaf = path
    return ".".join([re.sub(r"^h_(\d+)$", r"h.\1", m) for m in modules] + [_LEAF_NAMES[leaf]])


def tensor_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{Hub name without the prefix: (parameter path, shape in the file)} of GPT2LMHeadModel's tensors for `cfg`'s
    architecture: q/k/v biases whether `cfg` has them or not, lm_head.weight only for an untied head, and
    vocab_size rows (those of a padded vocabulary beyond it are no token's)."""
    layout = {}
    for path, shape in parameter_shapes(dataclasses.replace(cfg, qkv_bias=True)).items():
        layout[hub_name(path)] = (path, (cfg.vocab_size, cfg.emb_dim) if path[0] in ("wte", "lm_head") else shape)
    return layout


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """The architecture in `folder/config.json` (missing keys take GPT2Config's defaults, as in transformers); a
    setting this model cannot express is a UserError naming it."""
    path = Path(folder) / CONFIG_FILE
    raw = read_json_object(path, f"a Hugging Face model: {CONFIG_FILE} and {WEIGHTS_FILE}")
    if raw.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type={raw['model_type']!r}; only GPT-2 models (model_type 'gpt2') load")
    hub = GPT2_DEFAULTS | raw
    bad = [k for k in _ARCHITECTURE if not (type(hub[k]) is int and hub[k] > 0)]
    if bad:
        raise UserError(f"{path}: {', '.join(bad)} must be positive integers")
    width = hub["n_embd"]
    for key, ok, model in (
        ("n_inner", hub["n_inner"] in (None, 4 * width), f"an MLP 4 x n_embd = {4 * width} wide"),
        ("activation_function", hub["activation_function"] in _TANH_GELU, "GELU's tanh approximation, gelu_new"),
        ("layer_norm_epsilon", hub["layer_norm_epsilon"] == LN_EPS, f"LayerNorm epsilon {LN_EPS}"),
        ("scale_attn_weights", hub["scale_attn_weights"] is True, "attention scores scaled by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", hub["scale_attn_by_inverse_layer_idx"] is False, "no per-layer scaling"),
        ("reorder_and_upcast_attn", hub["reorder_and_upcast_attn"] is False, "GPT-2's attention order"),
        ("add_cross_attention", hub["add_cross_attention"] is False, "no cross-attention"),
    ):
        if not ok:
            raise UserError(f"{path}: {key}={hub[key]!r} cannot be expressed by this model ({model} only)")
    if width % hub["n_head"]:
        raise UserError(f"{path}: n_embd={width} is not divisible by n_head={hub['n_head']}")
    cfg = model_config_from_hparams({"n_vocab": hub["vocab_size"], "n_ctx": hub["n_positions"], "n_embd": width,
                                     "n_head": hub["n_head"], "n_layer": hub["n_layer"]})
    return dataclasses.replace(cfg, tie_embeddings=bool(hub["tie_word_embeddings"]))


def load_folder(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, float32 NumPy params) of the GPT-2 in a Hub folder: config.json and model.safetensors (or the
    shards a model.safetensors.index.json lists). Every tensor must be used (the causal-mask buffers aside) and
    every parameter filled with its shape, else a UserError names the tensor."""
    folder = Path(folder)
    cfg = read_config(folder)
    files = _weight_files(folder)
    where = str(files[0]) if len(files) == 1 else f"the safetensors files of {folder}"
    with contextlib.ExitStack() as stack:
        handles = {}  # name in the file -> its open file
        for file in files:
            try:
                opened = stack.enter_context(safe_open(file, framework="np"))
            except (OSError, SafetensorError) as e:
                raise _unreadable(file, e) from e
            handles |= dict.fromkeys(opened.keys(), (opened, file))
        names = _canonical_names(handles, where)
        cfg = _head(cfg, names, lambda name: handles[names[name]][0].get_tensor(names[name]), where)
        layout = tensor_layout(cfg)
        prefix = PREFIX if any(name.startswith(PREFIX) for name in handles) else ""
        shown = {c: names.get(c, c if c == HEAD else prefix + c) for c in [*names, *layout]}  # as the file has it
        check_names([shown[c] for c in names], [shown[c] for c in layout], "tensor", where,
                    f"is it a GPT-2 and does {CONFIG_FILE} match it?")
        flat = {}
        for canonical, (path, shape) in layout.items():
            opened, file = handles[names[canonical]]
            flat[path] = _read(opened, names[canonical], shape, file)
            if canonical == HEAD:
                flat[path] = np.ascontiguousarray(flat[path].T)  # nn.Linear (out, in) -> kernel (in, out)
    q_k_v_biases = [path for path in flat if path[1:] == ("attn", "c_attn", "bias")]
    if not any(flat[path].any() for path in q_k_v_biases):  # an export of a model without them
        cfg = dataclasses.replace(cfg, qkv_bias=False)
        for path in q_k_v_biases:
            del flat[path]
    return cfg, traverse_util.unflatten_dict(flat)


def to_hub(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """The tensors of model.safetensors, named as GPT2LMHeadModel.save_pretrained names them, holding `params`.
    A model GPT2LMHeadModel cannot express is a UserError naming its config key."""
    check_expressible(cfg)
    flat = traverse_util.flatten_dict(params)
    layout = tensor_layout(cfg)
    unknown = sorted("/".join(path) for path in flat.keys() - {path for path, _ in layout.values()})
    if unknown:
        raise UserError(f"the model's parameter {unknown[0]} has no counterpart in transformers' GPT2LMHeadModel")
    tensors = {}
    for name, (path, shape) in layout.items():
        if path not in flat:  # the q/k/v biases of a model without them
            value = np.zeros(shape, np.float32)
        elif path[0] == "wte":
            value = np.asarray(flat[path], np.float32)[:cfg.vocab_size]
        elif name == HEAD:
            value = np.asarray(flat[path], np.float32)[:, :cfg.vocab_size].T
        else:
            value = np.asarray(flat[path], np.float32)
        if value.shape != shape:
            raise UserError(f"the model's parameter {'/'.join(path)} has shape {value.shape}; its config says {shape}")
        tensors[name if name == HEAD else PREFIX + name] = np.ascontiguousarray(value)
    return tensors


def check_expressible(cfg: ModelConfig) -> None:
    """A UserError naming the first `model.*` key whose value transformers' GPT2LMHeadModel has no setting for."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name not in _EXPRESSIBLE and value != field.default:
            raise UserError(f"model.{field.name}={value!r} has no equivalent in transformers' GPT2LMHeadModel; "
                            f"only a model with model.{field.name}={field.default!r} can be exported")


def hub_config(cfg: ModelConfig, drop_rate: float) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel of `cfg`'s architecture that trains with dropout `drop_rate`."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": drop_rate, "embd_pdrop": drop_rate, "attn_pdrop": drop_rate,
        "initializer_range": cfg.init_std, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True,
        "bos_token_id": END_OF_TEXT_ID, "eos_token_id": END_OF_TEXT_ID,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
    }


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, else the shards that model.safetensors.index.json lists."""
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    index = folder / INDEX_FILE
    if not index.is_file():
        raise UserError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}; a Hugging Face model folder needs its "
                        "weights as safetensors (transformers' save_pretrained writes them)")
    try:
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} could not be read ({type(e).__name__}: {e}); replace it") from e


def _canonical_names(handles: dict[str, Any], where: str) -> dict[str, str]:
    """{name without the `transformer.` prefix: name in the file} of every tensor but the causal-mask buffers."""
    names = {}
    for name in handles:
        canonical = name.removeprefix(PREFIX)
        if _BUFFERS.fullmatch(canonical):
            continue
        if canonical in names:
            raise UserError(f"unexpected tensor {name} in {where}: {names[canonical]} is the same parameter")
        names[canonical] = name
    return names


def _head(cfg: ModelConfig, names: dict[str, str], tensor: Any, where: str) -> ModelConfig:
    """`cfg` with the head the file holds: untied if it has an lm_head.weight that is not wte.weight (which is then
    left out of `names`); a config.json that ties the head over such a tensor is a UserError."""
    if HEAD not in names or "wte.weight" not in names:
        return cfg
    if np.array_equal(tensor(HEAD), tensor("wte.weight")):
        del names[HEAD]
        return dataclasses.replace(cfg, tie_embeddings=True)
    if cfg.tie_embeddings:
        raise UserError(f"{where} has an lm_head.weight that differs from wte.weight, but {CONFIG_FILE} ties them "
                        "(tie_word_embeddings is true): set it to false for the untied head")
    return cfg


def _read(opened: Any, name: str, shape: tuple[int, ...], file: Path) -> np.ndarray:
    """Tensor `name` as float32, checked to have `shape` and a floating-point dtype."""
    tensor = opened.get_slice(name)
    got, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
    if got != shape:
        raise UserError(f"tensor {name} in {file} has shape {got}, expected {shape} "
                        f"(does {CONFIG_FILE} match the weights?)")
    if not dtype.startswith(("F", "BF")):
        raise UserError(f"tensor {name} in {file} has dtype {dtype}; weights must be floating point")
    try:
        return np.asarray(opened.get_tensor(name), np.float32)
    except (OSError, SafetensorError) as e:
        raise _unreadable(file, e) from e


def _unreadable(file: Path, error: Exception) -> UserError:
    return DamagedWeights(f"{file} could not be read ({error})", file)
