"""Muon (Keller Jordan's, modded-nanogpt) for the hidden weight matrices, AdamW for the rest: `train.optimizer="muon"`.

The attention and MLP kernels get `optax.contrib.scale_by_muon` (Nesterov momentum, orthogonalised by Newton-Schulz
iterations) times sqrt(max(1, fan_out / fan_in)) for a (fan_in, fan_out) kernel (`compat.scale_by_muon`: optax's
lines differ on where that factor lives), then decoupled weight decay and the learning rate. The fused c_attn
kernel is orthogonalised as its q, k and v blocks apart (as modded-nanogpt does; with grouped key/value heads k and
v are narrower than q); its momentum is kept per block, each named as the kernel is, so a mesh splits it alike. The
embeddings, the head, biases and gains get AdamW. The two groups are one `optax.multi_transform` over labels made
from the parameters' paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mygpt_jax import compat
from mygpt_jax.config import muon_ns_coeffs

_HIDDEN_MODULES = ("attn", "mlp")  # their dense kernels are the hidden matrices


def labels(params: Any) -> Any:
    """"muon" for every kernel inside an attention or MLP module, "adamw" for every other leaf (the tree may hold
    logical-axis boxes: their paths' extra entries are not names)."""
    def label(path: tuple, _: Any) -> str:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return "muon" if names[-1] == "kernel" and any(m in names for m in _HIDDEN_MODULES) else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


def _on_qkv_kernels(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """The tree with `fn` applied to each c_attn kernel."""
    if not isinstance(tree, Mapping):
        return tree
    return {name: ({**node, "kernel": fn(node["kernel"])} if name == "c_attn" and isinstance(node, Mapping)
                   else _on_qkv_kernels(node, fn)) for name, node in tree.items()}


def _split(kernel: Any) -> dict[str, Any]:
    """A (d, (heads + 2 kv_heads) head_dim) kernel as its q, k and v blocks (q is d wide: heads x head_dim = d);
    a logical-axis box (an optimizer state made for the mesh, `sharding.state_shardings`) as a box per block."""
    if isinstance(kernel, nn.meta.AxisMetadata):
        return {name: kernel.replace_boxed(block) for name, block in _split(kernel.unbox()).items()}
    d, columns = kernel.shape
    kv = (columns - d) // 2
    return dict(zip("qkv", jnp.split(kernel, [d, d + kv], axis=-1), strict=True))


def _join(blocks: dict[str, jax.Array]) -> jax.Array:
    return jnp.concatenate([blocks[name] for name in "qkv"], axis=-1)


def blockwise_qkv(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` seeing each c_attn kernel as three matrices q, k, v (its state kept per block)."""
    def split(tree: Any) -> Any:
        return None if tree is None else _on_qkv_kernels(tree, _split)

    def init(params: Any) -> Any:
        return inner.init(split(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = inner.update(split(updates), state, split(params))
        return _on_qkv_kernels(updates, _join), state

    return optax.GradientTransformation(init, update)


def muon(t: ml_collections.ConfigDict, schedule: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The Muon group's transformation at `schedule` (`steps.learning_rate` peaking at train.muon_learning_rate)."""
    orthogonalised = compat.scale_by_muon(ns_coeffs=muon_ns_coeffs(t), ns_steps=t.muon_ns_steps,
                                          beta=t.muon_momentum, nesterov=True)
    return optax.chain(blockwise_qkv(orthogonalised), optax.add_decayed_weights(t.muon_weight_decay),
                       optax.scale_by_learning_rate(schedule))


def split_optimizer(t: ml_collections.ConfigDict, muon_schedule: optax.ScalarOrSchedule,
                    adamw: optax.GradientTransformation) -> optax.GradientTransformation:
    """Muon for the hidden matrices, `adamw` for every other leaf."""
    return optax.multi_transform({"muon": muon(t, muon_schedule), "adamw": adamw}, labels)
