"""GPT-2 in Flax linen: the whole model on one screen.

Parameter names follow OpenAI's checkpoint (wte, wpe, h_{i}/ln_1, attn/c_attn, attn/c_proj, ln_2,
mlp/c_fc, mlp/c_proj, ln_f), so converting the original weights is a rename. Every weight carries
logical axis names (`nn.with_logical_partitioning`) for sharding; `init_params` returns plain arrays.

Decoding uses an explicit KV cache: `GPT.__call__(tokens, cache=..., cache_index=i)` writes the new
keys/values at positions i.. and returns the updated cache, so the decode step stays a pure function.

Since 2019's GPT-2 (docs/modern.md): each switch below is chosen once, where it acts, and defaults to GPT-2 -
rotary positions, RMSNorm, QK-norm, ReLU²/SwiGLU MLPs, grouped key/value heads, biases, logit soft-capping,
zero-initialised output projections.

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
    position: str = "learned"  # "learned" (GPT-2's wpe table) or "rope" (rotary embeddings on q and k)
    rope_base: float = 10000.0
    norm: str = "layernorm"  # or "rmsnorm"
    norm_scale: bool = True  # the norms' learnable gain
    qk_norm: bool = False  # RMS-normalise queries and keys per head before the scores (no parameters)
    mlp: str = "gelu"  # "gelu" (GPT-2), "relu2" (ReLU squared) or "swiglu" (gated, `mlp_hidden` wide)
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads
    bias: bool = True  # biases of the dense layers and norms other than c_attn, whose bias is qkv_bias's
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c)
    zero_init_proj: bool = False  # attention's and the MLP's c_proj start at zero (either init_scheme)

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
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4 d, or for SwiGLU's three matrices 8 d / 3 rounded to the nearest multiple of 8,
        so that its weights are as many as the 4 d MLP's (exactly when 8 d / 3 is a multiple of 8, as d = 768's
        2048)."""
        return 4 * self.emb_dim if self.mlp != "swiglu" else max(8, round(8 * self.emb_dim / 3 / 8) * 8)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class KVCache(NamedTuple):
    """Keys (rotated, with rotary positions) and values of one layer for every position it holds: (batch,
    kv_heads, positions, head_dim), where positions <= context_length (`init_cache`).

    Heads before positions: the attention matmuls read the cache in place (with positions first, XLA
    transposed both caches of every layer at every decoding step).
    """

    k: jax.Array
    v: jax.Array


def _uniform(bound: float) -> Callable:
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(cfg: ModelConfig, backend: Backend, fan_in: int, features: int, axes: tuple[str, str], name: str,
           use_bias: bool | None = None, residual: bool = False) -> nn.Dense:
    """A linear layer in the compute dtype with float32 parameters, initialised by `cfg.init_scheme`, computing
    its product with the backend's `dot_general`; with a bias where `use_bias` (default `cfg.bias`) says.

    "gpt2": N(0, init_std) weights, zero biases; projections into the residual stream scaled by
    1/sqrt(2 n_layers). "pytorch": nn.Linear's defaults, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
    and biases (what the seed run used). `zero_init_proj`: those projections start at zero under either.
    """
    if residual and cfg.zero_init_proj:
        kernel_init = bias_init = nn.initializers.zeros
    elif cfg.init_scheme == "pytorch":
        kernel_init = bias_init = _uniform(fan_in ** -0.5)
    else:
        std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if residual else cfg.init_std
        kernel_init, bias_init = nn.initializers.normal(std), nn.initializers.zeros
    return nn.Dense(features, use_bias=cfg.bias if use_bias is None else use_bias, dtype=cfg.compute_dtype,
                    param_dtype=jnp.float32, kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)), dot_general=backend.dot_general,
                    name=name)


def _embed(cfg: ModelConfig, num: int, axes: tuple[str, str], name: str) -> nn.Embed:
    """Embeddings: N(0, init_std) for "gpt2", N(0, 1) (nn.Embedding's default) for "pytorch"."""
    std = 1.0 if cfg.init_scheme == "pytorch" else cfg.init_std
    return nn.Embed(num, cfg.emb_dim, name=name, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm (`cfg.norm`); a gain if `cfg.norm_scale`, LayerNorm's bias if `cfg.bias`."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=LN_EPS, name=name, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                          use_scale=cfg.norm_scale, scale_init=scale_init)
    return nn.LayerNorm(epsilon=LN_EPS, name=name, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                        use_scale=cfg.norm_scale, use_bias=cfg.bias, scale_init=scale_init,
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def positions_of(cache_index: jax.Array | int, t: int) -> jax.Array:
    """The absolute positions of a chunk of t tokens starting at `cache_index`: (t,) for a scalar start, (batch, t)
    for one start per row."""
    return jnp.asarray(cache_index)[..., None] + jnp.arange(t)


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of x (batch, t, heads, head_dim) at `positions` ((t,) or (batch, t)), in the
    half-split (`rotate_half`, Llama) convention: dimension i pairs with i + head_dim / 2, rotated by the angle
    position * base^(-2i / head_dim). Angles and the rotation are computed in float32."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.expand_dims(positions.astype(jnp.float32)[..., None] * inv_freq, -2)  # (..., t, 1, half)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rms_normalise(x: jax.Array) -> jax.Array:
    """QK-norm: x / rms(x) over the head dimension, in float32, no gain (nanochat's and modded-nanogpt's)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + LN_EPS)).astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Causal self-attention with a fused q/k/v projection (OpenAI's c_attn): n_heads query heads and kv_heads
    key/value heads (fewer: grouped-query attention, each shared by n_heads / kv_heads query heads), QK-norm and
    rotary positions applied to q and k before any attention.

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
        h, kv = cfg.n_heads, cfg.kv_heads
        qkv = _dense(cfg, self.backend, d, (h + 2 * kv) * cfg.head_dim, ("embed", "qkv"), "c_attn",
                     use_bias=cfg.qkv_bias)(x)
        q, k, v = jnp.split(qkv.reshape(b, t, h + 2 * kv, cfg.head_dim), [h, h + kv], axis=2)
        if cfg.qk_norm:
            q, k = _rms_normalise(q), _rms_normalise(k)
        if cfg.position == "rope":
            positions = positions_of(cache_index, t)
            q, k = rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base)
        if cache is None and cfg.attention != "explicit":
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
        else:
            out, cache = _explicit_attention(cfg, q, k, v, self.backend.dropout(cfg.drop_rate), deterministic,
                                             cache, cache_index)
        out = _dense(cfg, self.backend, d, d, ("heads", "embed"), "c_proj", residual=True)(out.reshape(b, t, d))
        return out, cache


def _explicit_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, dropout: nn.Module,
                        deterministic: bool, cache: KVCache | None, cache_index: jax.Array | int
                        ) -> tuple[jax.Array, KVCache | None]:
    """Causal attention written out (scores, mask, softmax, dropout on the weights, weighted sum), reading
    and writing the KV cache: q (batch, t, heads, head_dim), k and v (batch, t, kv_heads, head_dim) ->
    (batch, t, heads, head_dim), cache. Query head n reads key/value head n // (heads / kv_heads), as
    `jax.nn.dot_product_attention` groups them."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd).transpose(0, 2, 3, 1, 4)  # (batch, kv_heads, group, t, head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (batch, kv_heads, t, head_dim)

    # Attend over blocks of (keys, values, which keys each query sees): this chunk, causally, and before
    # it the cache's positions < cache_index. The cache is read as it was and this chunk written into
    # it afterwards (not read back), so XLA can update it in place instead of copying it every step.
    blocks = [(k, v, jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])]
    if cache is not None:
        past = jnp.arange(cache.k.shape[2]) < cache_index
        blocks.insert(0, (cache.k.astype(q.dtype), cache.v.astype(q.dtype), jnp.broadcast_to(past, (t, past.size))))
        cache = KVCache(*(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, 0, cache_index, 0))
                          for c, new in ((cache.k, k), (cache.v, v))))

    scores = jnp.concatenate([jnp.einsum("bkgqd,bksd->bkgqs", q, keys) for keys, _, _ in blocks], axis=-1)
    visible = jnp.concatenate([seen for _, _, seen in blocks], axis=-1)
    scores = jnp.where(visible, scores.astype(jnp.float32) / hd ** 0.5, jnp.finfo(jnp.float32).min)
    weights = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype), deterministic)
    weights = jnp.split(weights, np.cumsum([keys.shape[2] for keys, _, _ in blocks[:-1]]), axis=-1)
    out = sum(jnp.einsum("bkgqs,bksd->bqkgd", w, values) for w, (_, values, _) in zip(weights, blocks, strict=True))
    return out.reshape(b, t, h, hd), cache


_ACTIVATIONS = {"gelu": lambda h: nn.gelu(h, approximate=True), "relu2": lambda h: jnp.square(nn.relu(h)),
                "swiglu": nn.silu}


class FeedForward(nn.Module):
    """Position-wise MLP d -> mlp_hidden -> d: GPT-2's tanh-approximated GELU, ReLU², or SwiGLU,
    silu(x W_fc) * (x W_up) (Shazeer 2020)."""

    cfg: ModelConfig
    backend: Backend

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, hidden = cfg.emb_dim, cfg.mlp_hidden
        h = _ACTIVATIONS[cfg.mlp](_dense(cfg, self.backend, d, hidden, ("embed", "mlp"), "c_fc")(x))
        if cfg.mlp == "swiglu":
            h = h * _dense(cfg, self.backend, d, hidden, ("embed", "mlp"), "c_up")(x)
        return _dense(cfg, self.backend, hidden, d, ("mlp", "embed"), "c_proj", residual=True)(h)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    cfg: ModelConfig
    backend: Backend

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        drop = self.backend.dropout(self.cfg.drop_rate)
        h, cache = MultiHeadAttention(self.cfg, self.backend, name="attn")(
            _norm(self.cfg, "ln_1")(x), deterministic, cache, cache_index)
        x = x + drop(h, deterministic)
        h = FeedForward(self.cfg, self.backend, name="mlp")(_norm(self.cfg, "ln_2")(x))
        x = x + drop(h, deterministic)
        return x, cache


def _unconstrained(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
    return x


class GPT(nn.Module):
    """Token (+ learned position) embeddings, n_layers pre-norm blocks, a final norm, the LM head (soft-capped
    if `logit_softcap`); computed as the `backend` profile says (`backends.current()`; the Generator's is
    `backend.for_decoding()`). Training on a mesh passes `constrain` (`sharding.activation_constraint`), which
    lays out the residual stream and the logits by their logical axis names; the model itself knows no mesh.

    `cache_index` is where the chunk starts: a scalar (a traced one too, as under `jax.vmap` over cache rows)."""

    cfg: ModelConfig
    backend: Backend
    constrain: Callable[[jax.Array, tuple[str, ...]], jax.Array] = _unconstrained

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True, cache: list[KVCache] | None = None,
                 cache_index: jax.Array | int = 0) -> tuple[jax.Array, list[KVCache] | None]:
        cfg = self.cfg
        wte = _embed(cfg, cfg.padded_vocab, ("vocab", "embed"), "wte")
        x = wte(tokens)
        if cfg.position == "learned":
            x = x + _embed(cfg, cfg.context_length, ("context", "embed"), "wpe")(positions_of(cache_index,
                                                                                               tokens.shape[1]))
        x = self.backend.dropout(cfg.drop_rate)(x, deterministic)
        stream = ("activation_batch", "activation_length", "activation_embed")

        block_cls = nn.remat(TransformerBlock, static_argnums=(2,)) if cfg.remat else TransformerBlock
        new_cache = []
        for i in range(cfg.n_layers):
            x, layer_cache = block_cls(cfg, self.backend, name=f"h_{i}")(
                self.constrain(x, stream), deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)

        x = _norm(cfg, "ln_f")(x)
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
        if cfg.logit_softcap > 0:  # before the padding rows' -inf, which capping would make finite
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
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
    shape = (batch_size, cfg.kv_heads, cfg.context_length if length is None else length, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def matmul_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token counting matrix multiplies only (forward + backward = 3x forward).

    6 x (parameters used in matmuls: attention/MLP weights and the LM head; the token-embedding lookup
    is free, position embeddings, norms, biases, rotary and soft-capping are not matmuls) + attention scores
    and weighted sum: 2 matmuls x 2 FLOPs x 3 (fwd+bwd) x L x d x T = 12 L d T (grouped key/value heads
    shrink the projection, not these).
    """
    t = seq_len or cfg.context_length
    d, L = cfg.emb_dim, cfg.n_layers
    qkv = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    mlp_matrices = 3 if cfg.mlp == "swiglu" else 2
    per_layer = d * qkv + d * d + mlp_matrices * d * cfg.mlp_hidden
    matmul_params = L * per_layer + d * cfg.padded_vocab
    return 6 * matmul_params + 12 * L * d * t
