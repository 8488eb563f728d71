"""GPT-2 in Flax linen: the whole model on one screen.

Parameter names follow OpenAI's checkpoint (wte, wpe, h_{i}/ln_1, attn/c_attn, attn/c_proj, ln_2,
mlp/c_fc, mlp/c_proj, ln_f), so converting the original weights is a rename. Every weight carries
logical axis names (`nn.with_logical_partitioning`) for sharding; `init_params` returns plain arrays.

Decoding uses an explicit KV cache: `GPT.__call__(tokens, cache=..., cache_index=i)` writes the new
keys/values at positions i.. and returns the updated cache, so the decode step stays a pure function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon (Flax's default is 1e-6)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False
    dtype: str = "float32"
    init_std: float = 0.02
    init_scheme: str = "gpt2"
    remat: bool = False

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict) -> "ModelConfig":
        return cls(**{f.name: model[f.name] for f in dataclasses.fields(cls)})

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class KVCache(NamedTuple):
    """Keys and values of one layer for every position: (batch, context_length, heads, head_dim)."""

    k: jax.Array
    v: jax.Array


def _uniform(bound: float) -> Callable:
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(cfg: ModelConfig, fan_in: int, features: int, axes: tuple[str, str], name: str,
           use_bias: bool = True, residual: bool = False) -> nn.Dense:
    """A linear layer initialised by `cfg.init_scheme`.

    "gpt2": N(0, init_std) weights, zero biases; projections into the residual stream scaled by
    1/sqrt(2 n_layers). "pytorch": nn.Linear's defaults, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
    and biases (what the seed run used).
    """
    if cfg.init_scheme == "pytorch":
        kernel_init = bias_init = _uniform(fan_in ** -0.5)
    else:
        std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if residual else cfg.init_std
        kernel_init, bias_init = nn.initializers.normal(std), nn.initializers.zeros
    return nn.Dense(
        features, use_bias=use_bias, name=name, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
    )


def _embed(cfg: ModelConfig, num: int, axes: tuple[str, str], name: str) -> nn.Embed:
    """Embeddings: N(0, init_std) for "gpt2", N(0, 1) (nn.Embedding's default) for "pytorch"."""
    std = 1.0 if cfg.init_scheme == "pytorch" else cfg.init_std
    return nn.Embed(num, cfg.emb_dim, name=name, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS, name=name, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )


class MultiHeadAttention(nn.Module):
    """Causal self-attention with a fused q/k/v projection (OpenAI's c_attn)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        b, t, d = x.shape
        qkv = _dense(cfg, d, 3 * d, ("embed", "qkv"), "c_attn", use_bias=cfg.qkv_bias)(x)
        q, k, v = jnp.split(qkv.reshape(b, t, 3 * cfg.n_heads, cfg.head_dim), 3, axis=2)

        q_pos = cache_index + jnp.arange(t)
        if cache is None:
            k_pos = q_pos
        else:  # write this chunk's keys/values at cache_index.., attend over the whole cache
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, cache_index, 0, 0))
            cache = KVCache(k, v)
            k_pos = jnp.arange(k.shape[1])
        causal = q_pos[:, None] >= k_pos[None, :]  # (t, keys)

        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype)) / jnp.sqrt(cfg.head_dim).astype(q.dtype)
        scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        weights = nn.Dropout(cfg.drop_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(q.dtype)).reshape(b, t, d)
        out = _dense(cfg, d, d, ("heads", "embed"), "c_proj", residual=True)(out)
        return out, cache


class FeedForward(nn.Module):
    """Position-wise MLP: d -> 4d -> d with GPT-2's tanh-approximated GELU."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = _dense(cfg, cfg.emb_dim, 4 * cfg.emb_dim, ("embed", "mlp"), "c_fc")(x)
        h = nn.gelu(h, approximate=True)
        return _dense(cfg, 4 * cfg.emb_dim, cfg.emb_dim, ("mlp", "embed"), "c_proj", residual=True)(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        drop = nn.Dropout(self.cfg.drop_rate)
        h, cache = MultiHeadAttention(self.cfg, name="attn")(
            _layer_norm(self.cfg, "ln_1")(x), deterministic, cache, cache_index)
        x = x + drop(h, deterministic=deterministic)
        h = FeedForward(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x))
        x = x + drop(h, deterministic=deterministic)
        return x, cache


class GPT(nn.Module):
    """Token + learned position embeddings, n_layers pre-LN blocks, final LayerNorm, LM head."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True, cache: list[KVCache] | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, list[KVCache] | None]:
        cfg = self.cfg
        wte = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), "wte")
        wpe = _embed(cfg, cfg.context_length, ("context", "embed"), "wpe")
        positions = cache_index + jnp.arange(tokens.shape[1])
        x = wte(tokens) + wpe(positions)[None]
        x = nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)

        block_cls = nn.remat(TransformerBlock, static_argnums=(2,)) if cfg.remat else TransformerBlock
        new_cache = []
        for i in range(cfg.n_layers):
            x, layer_cache = block_cls(cfg, name=f"h_{i}")(
                x, deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)

        x = _layer_norm(cfg, "ln_f")(x)
        if cfg.tie_embeddings:
            logits = wte.attend(x)
        else:
            logits = _dense(cfg, cfg.emb_dim, cfg.vocab_size, ("embed", "vocab"), "lm_head", use_bias=False)(x)
        return logits.astype(jnp.float32), (None if cache is None else new_cache)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Random float32 parameters (plain arrays, logical-axis boxes removed)."""
    tokens = jnp.zeros((1, min(8, cfg.context_length)), jnp.int32)
    variables = jax.jit(GPT(cfg).init)({"params": rng}, tokens)
    return nn.meta.unbox(variables["params"])


def logical_axes(cfg: ModelConfig) -> Any:
    """The logical axis names of every parameter (same tree as the params), for sharding rules."""
    tokens = jnp.zeros((1, min(8, cfg.context_length)), jnp.int32)
    boxed = jax.eval_shape(GPT(cfg).init, {"params": jax.random.key(0)}, tokens)["params"]
    return nn.get_partition_spec(boxed)


def init_cache(cfg: ModelConfig, batch_size: int, dtype: Any = None) -> list[KVCache]:
    """A zeroed KV cache for every layer, long enough for the whole context."""
    shape = (batch_size, cfg.context_length, cfg.n_heads, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def matmul_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token counting matrix multiplies only (forward + backward = 3x forward).

    6 x (parameters used in matmuls: attention/MLP weights and the LM head; the token-embedding lookup
    is free, position embeddings, LayerNorms and biases are not matmuls) + attention scores and
    weighted sum: 2 matmuls x 2 FLOPs x 3 (fwd+bwd) x L x d x T = 12 L d T.
    """
    t = seq_len or cfg.context_length
    d, L = cfg.emb_dim, cfg.n_layers
    per_layer = d * 3 * d + d * d + d * 4 * d + 4 * d * d
    matmul_params = L * per_layer + d * cfg.vocab_size
    return 6 * matmul_params + 12 * L * d * t
