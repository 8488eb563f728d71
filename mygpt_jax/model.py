"""GPT-2 in Flax linen: the whole model on one screen.

Parameter names follow OpenAI's checkpoint (wte, wpe, h_{i}/ln_1, attn/c_attn, attn/c_proj, ln_2,
mlp/c_fc, mlp/c_proj, ln_f), so converting the original weights is a rename. Every weight carries
logical axis names (`nn.with_logical_partitioning`) for sharding; `init_params` returns plain arrays.

Decoding uses an explicit KV cache: `GPT.__call__(tokens, cache=..., cache_index=i)` writes the new
keys/values at positions i.. and returns the updated cache, so the decode step stays a pure function.

For speed (measured by `python -m mygpt_jax.bench`): q/k/v come from one fused matmul, and the cache keeps
heads before positions so attention reads it without transposes. What differs between backends (the dropout
layer, the dense layers' product, the attention the config resolves to) comes from the `backend` profile every
module gets (mygpt_jax/backends/): the model itself is the same on every device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mygpt_jax.backends.profile import STOCK, Backend, DecodeLayout, dense_dimensions

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
    dtype: str = "float32"  # the compute dtype (parameters are float32)
    init_std: float = 0.02
    init_scheme: str = "gpt2"
    remat: bool = False
    attention: str = "explicit"  # or "cudnn", "xla": jax.nn.dot_product_attention (MultiHeadAttention)
    vocab_multiple: int = 1  # the embedding and head rows are padded to a multiple of this (never predicted)

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict) -> ModelConfig:
        """From a config's `model` section; keys it lacks (a checkpoint saved before they existed) get the
        defaults here."""
        return cls(**{f.name: model.get(f.name, f.default) for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        if "auto" in (self.dtype, self.attention):
            raise ValueError("a config's 'auto' values are resolved first: backends.resolve(config, backend)")

    @property
    def padded_vocab(self) -> int:
        """The rows of the token embedding and the LM head: vocab_size rounded up to vocab_multiple (nanoGPT's
        50304 for 128), so that mesh.tensor can split them and their products tile evenly."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class KVCache(NamedTuple):
    """Keys and values of one layer for every position it holds: (batch, heads, positions, head_dim), where
    positions <= context_length (`init_cache`).

    Heads before positions: the attention matmuls read the cache in place (with positions first, XLA
    transposed both caches of every layer at every decoding step).
    """

    k: jax.Array
    v: jax.Array


def _uniform(bound: float) -> Callable:
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(cfg: ModelConfig, backend: Backend, fan_in: int, features: int, axes: tuple[str, str], name: str,
           use_bias: bool = True, residual: bool = False) -> nn.Dense:
    """A linear layer in the compute dtype with float32 parameters, initialised by `cfg.init_scheme`, computing
    its product with the backend's `dot_general`.

    "gpt2": N(0, init_std) weights, zero biases; projections into the residual stream scaled by
    1/sqrt(2 n_layers). "pytorch": nn.Linear's defaults, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
    and biases (what the seed run used).
    """
    if cfg.init_scheme == "pytorch":
        kernel_init = bias_init = _uniform(fan_in ** -0.5)
    else:
        std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if residual else cfg.init_std
        kernel_init, bias_init = nn.initializers.normal(std), nn.initializers.zeros
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)), dot_general=backend.dot_general,
                    name=name)


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
    """Causal self-attention with a fused q/k/v projection (OpenAI's c_attn).

    Written out by default (`_explicit_attention`: the KV cache, dropout on the attention weights); with
    `attention="cudnn"` or `"xla"`, passes without a cache call `jax.nn.dot_product_attention` instead.
    """

    cfg: ModelConfig
    backend: Backend

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        b, t, d = x.shape
        qkv = _dense(cfg, self.backend, d, 3 * d, ("embed", "qkv"), "c_attn", use_bias=cfg.qkv_bias)(x)
        qkv = qkv.reshape(b, t, 3 * cfg.n_heads, cfg.head_dim)
        if cache is None and cfg.attention != "explicit":
            out = _fused_attention(cfg, qkv)
        else:
            out, cache = _explicit_attention(cfg, qkv, self.backend.dropout(cfg.drop_rate), deterministic, cache,
                                             cache_index)
        out = _dense(cfg, self.backend, d, d, ("heads", "embed"), "c_proj", residual=True)(out.reshape(b, t, d))
        return out, cache


def _fused_attention(cfg: ModelConfig, qkv: jax.Array) -> jax.Array:
    """Causal attention in one `jax.nn.dot_product_attention` call: qkv (batch, t, 3 heads, head_dim) ->
    (batch, t, heads, head_dim). `cfg.attention` names its implementation: "cudnn" is cuDNN's fused
    (flash) kernel on NVIDIA GPUs, "xla" JAX's own lowering. Neither drops attention weights out, so the
    config allows them only with drop_rate 0 (`config.validate`), and "cudnn" only on a GPU that has it
    (`backends.resolve`)."""
    q, k, v = jnp.split(qkv, 3, axis=2)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)


def _explicit_attention(cfg: ModelConfig, qkv: jax.Array, dropout: nn.Module, deterministic: bool,
                        cache: KVCache | None, cache_index: jax.Array | int) -> tuple[jax.Array, KVCache | None]:
    """Causal attention written out (scores, mask, softmax, dropout on the weights, weighted sum), reading
    and writing the KV cache: qkv (batch, t, 3 heads, head_dim) -> (batch, t, heads, head_dim), cache."""
    t = qkv.shape[1]
    q, k, v = jnp.split(qkv.transpose(0, 2, 1, 3), 3, axis=1)  # (batch, heads, t, head_dim)

    # Attend over blocks of (keys, values, which keys each query sees): this chunk, causally, and before
    # it the cache's positions < cache_index. The cache is read as it was and this chunk written into
    # it afterwards (not read back), so XLA can update it in place instead of copying it every step.
    q_pos = cache_index + jnp.arange(t)
    blocks = [(k, v, q_pos[:, None] >= q_pos[None, :])]
    if cache is not None:
        past = jnp.arange(cache.k.shape[2]) < cache_index
        blocks.insert(0, (cache.k.astype(q.dtype), cache.v.astype(q.dtype), jnp.broadcast_to(past, (t, past.size))))
        cache = KVCache(*(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, 0, cache_index, 0))
                          for c, new in ((cache.k, k), (cache.v, v))))

    scores = jnp.concatenate([jnp.einsum("bhqd,bhkd->bhqk", q, keys) for keys, _, _ in blocks], axis=-1)
    visible = jnp.concatenate([seen for _, _, seen in blocks], axis=-1)
    scores = jnp.where(visible, scores.astype(jnp.float32) / cfg.head_dim ** 0.5, jnp.finfo(jnp.float32).min)
    weights = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype), deterministic)
    weights = jnp.split(weights, np.cumsum([keys.shape[2] for keys, _, _ in blocks[:-1]]), axis=-1)
    out = sum(jnp.einsum("bhqk,bhkd->bqhd", w, values) for w, (_, values, _) in zip(weights, blocks, strict=True))
    return out, cache


class FeedForward(nn.Module):
    """Position-wise MLP: d -> 4d -> d with GPT-2's tanh-approximated GELU."""

    cfg: ModelConfig
    backend: Backend

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = _dense(cfg, self.backend, cfg.emb_dim, 4 * cfg.emb_dim, ("embed", "mlp"), "c_fc")(x)
        h = nn.gelu(h, approximate=True)
        return _dense(cfg, self.backend, 4 * cfg.emb_dim, cfg.emb_dim, ("mlp", "embed"), "c_proj", residual=True)(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    cfg: ModelConfig
    backend: Backend

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        drop = self.backend.dropout(self.cfg.drop_rate)
        h, cache = MultiHeadAttention(self.cfg, self.backend, name="attn")(
            _layer_norm(self.cfg, "ln_1")(x), deterministic, cache, cache_index)
        x = x + drop(h, deterministic)
        h = FeedForward(self.cfg, self.backend, name="mlp")(_layer_norm(self.cfg, "ln_2")(x))
        x = x + drop(h, deterministic)
        return x, cache


def _unconstrained(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
    return x


class GPT(nn.Module):
    """Token + learned position embeddings, n_layers pre-LN blocks, final LayerNorm, LM head; computed as the
    `backend` profile says (`backends.current()`; the Generator's is `backend.for_decoding()`). Training on a
    mesh passes `constrain` (`sharding.activation_constraint`), which lays out the residual stream and the
    logits by their logical axis names; the model itself knows no mesh."""

    cfg: ModelConfig
    backend: Backend
    constrain: Callable[[jax.Array, tuple[str, ...]], jax.Array] = _unconstrained

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True, cache: list[KVCache] | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, list[KVCache] | None]:
        cfg = self.cfg
        wte = _embed(cfg, cfg.padded_vocab, ("vocab", "embed"), "wte")
        wpe = _embed(cfg, cfg.context_length, ("context", "embed"), "wpe")
        positions = cache_index + jnp.arange(tokens.shape[1])
        x = wte(tokens) + wpe(positions)[None]
        x = self.backend.dropout(cfg.drop_rate)(x, deterministic)
        stream = ("activation_batch", "activation_length", "activation_embed")

        block_cls = nn.remat(TransformerBlock, static_argnums=(2,)) if cfg.remat else TransformerBlock
        new_cache = []
        for i in range(cfg.n_layers):
            x, layer_cache = block_cls(cfg, self.backend, name=f"h_{i}")(
                self.constrain(x, stream), deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)

        x = _layer_norm(cfg, "ln_f")(x)
        if cfg.tie_embeddings:
            x, table = x.astype(cfg.compute_dtype), wte.embedding.astype(cfg.compute_dtype)
            # Decoding (with a cache) contracts wte's last axis in place: as x @ wte.T, XLA:CPU copied the
            # transposed table for its matrix-vector product. Other passes take the dense layers' product.
            logits = (jnp.einsum("btk,vk->btv", x, table) if cache is not None
                      else self.backend.dot_general(x, table.T, dense_dimensions(x.ndim)))
        else:
            logits = _dense(cfg, self.backend, cfg.emb_dim, cfg.padded_vocab, ("embed", "vocab"), "lm_head",
                            use_bias=False)(x)
        logits = self.constrain(logits.astype(jnp.float32),
                                ("activation_batch", "activation_length", "activation_vocab"))
        if cfg.padded_vocab > cfg.vocab_size:  # padding rows are never predicted: not in the loss, not sampled
            logits = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, logits, -jnp.inf)
        return logits, (None if cache is None else new_cache)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Random float32 parameters (plain arrays, logical-axis boxes removed); the same on every backend."""
    tokens = jnp.zeros((1, min(8, cfg.context_length)), jnp.int32)
    variables = jax.jit(GPT(cfg, STOCK).init)({"params": rng}, tokens)
    return nn.meta.unbox(variables["params"])


def boxed_params(cfg: ModelConfig) -> Any:
    """The parameters' shapes (ShapeDtypeStructs, nothing computed) in their logical-axis boxes."""
    tokens = jnp.zeros((1, min(8, cfg.context_length)), jnp.int32)
    return jax.eval_shape(GPT(cfg, STOCK).init, {"params": jax.random.key(0)}, tokens)["params"]


def logical_axes(cfg: ModelConfig, layout: DecodeLayout | None = None) -> Any:
    """The logical axis names of every parameter, for sharding rules: the tree of `init_params`' params, or
    with a decoding layout (`backend.decode_layout`) the tree of the weights as the Generator stores them."""
    axes = nn.get_partition_spec(boxed_params(cfg))
    return axes if layout is None else layout.store(axes)


def pad_vocab(cfg: ModelConfig, params: Any) -> Any:
    """Weights of `cfg.vocab_size` rows (pretrained GPT-2's) with zero rows added up to `cfg.padded_vocab`."""
    def pad(table: Any) -> Any:
        return jnp.pad(table, [(0, cfg.padded_vocab - table.shape[0]), (0, 0)])

    params = dict(params, wte={"embedding": pad(params["wte"]["embedding"])})
    if "lm_head" in params:
        params["lm_head"] = {"kernel": pad(params["lm_head"]["kernel"].T).T}
    return params


def init_cache(cfg: ModelConfig, batch_size: int, *, length: int | None = None, dtype: Any = None) -> list[KVCache]:
    """A zeroed KV cache for every layer, holding `length` positions (default: the whole context).

    Attention reads every position the cache holds, used or not, so a shorter cache decodes faster."""
    shape = (batch_size, cfg.n_heads, cfg.context_length if length is None else length, cfg.head_dim)
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
    matmul_params = L * per_layer + d * cfg.padded_vocab
    return 6 * matmul_params + 12 * L * d * t
