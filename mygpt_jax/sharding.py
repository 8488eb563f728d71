"""How arrays lie on the devices: the mesh, the logical-axis rules, the shardings of the state and the batches.

The mesh always has three axes, size 1 included, so one program serves one device and many:
- `data`: the batch is split, the parameters replicated; throughput.
- `fsdp`: the batch is split and so are the parameters and the optimizer state (on their `embed` axis), gathered
  for each layer's products; memory.
- `tensor`: the MLP's hidden units (SwiGLU's gate too), the attention heads' q/k/v columns (query and key/value
  heads alike, so both counts must divide) and the vocabulary are split; very wide models.

The model names each parameter dimension (`model.logical_axes`); `RULES` maps those names to mesh axes. The
residual stream and the logits are constrained with names of their own (`activation_*`) so that no array maps
a mesh axis twice (the batch takes `fsdp`, which parameters' `embed` takes too). Mesh and shardings are built
directly (`Mesh`, `NamedSharding`) with no mesh context and no flax logical constraint, which both JAX lines this
project runs on (0.5.0 for jax-metal, 0.10) read alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mygpt_jax.data import gather
from mygpt_jax.errors import UserError
from mygpt_jax.model import GPT, ModelConfig, boxed_params
from mygpt_jax.steps import TrainState

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the mesh axes a batch's rows are split over
RULES = (
    ("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"), ("qkv", "tensor"),
    ("embed", "fsdp"), ("context", None),
    ("activation_batch", BATCH), ("activation_length", None), ("activation_embed", None),
    ("activation_vocab", "tensor"),
)


def make_mesh(mesh: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh of `mesh.data`, `mesh.fsdp`, `mesh.tensor` over every device (-1: the
    devices the other two leave); sizes that do not multiply to the device count are a UserError."""
    devices = jax.devices() if devices is None else devices
    sizes = {axis: mesh[axis] for axis in AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    keys = ", ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise UserError(f"{keys}: give each axis a positive size, and -1 (the devices left over) to one axis at most")
    if free:
        if len(devices) % fixed:
            raise UserError(f"{keys}: {len(devices)} devices cannot be split {fixed} ways; choose sizes that divide "
                            f"{len(devices)}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise UserError(f"{keys} makes a mesh of {math.prod(sizes.values())} devices, and there are {len(devices)}; "
                        "make the sizes multiply to the device count (or set one to -1)")
    # Devices in jax's order (process by process), data outermost: each process holds whole rows of a batch.
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), AXES)


def check_fits(cfg: ModelConfig, mesh: Mesh, rows: int, rows_key: str) -> None:
    """A UserError naming the key when a mesh axis does not divide what it splits: a dimension of the model, or
    the `rows` of a (micro-)batch."""
    shape = mesh.shape
    tensor, fsdp, batch = shape["tensor"], shape["fsdp"], shape["data"] * shape["fsdp"]
    if cfg.padded_vocab % tensor:
        raise UserError(f"--config.mesh.tensor={tensor} does not divide the vocabulary of {cfg.padded_vocab} rows; "
                        f"pad it with --config.model.vocab_multiple (128 gives {-(-cfg.vocab_size // 128) * 128})")
    for key, size, axis, n in (("model.emb_dim", cfg.emb_dim, "fsdp", fsdp), ("model.n_heads", cfg.n_heads, "tensor",
                                                                               tensor),
                               ("model.n_kv_heads", cfg.kv_heads, "tensor", tensor)):
        if size % n:
            raise UserError(f"--config.{key}={size} is not divisible by --config.mesh.{axis}={n}; choose a mesh that "
                            "divides the model")
    if rows % batch:
        raise UserError(f"{rows_key} gives {rows} rows, which mesh.data x mesh.fsdp = {batch} devices cannot share; "
                        "make it a multiple of that")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(logical: Any, mesh: Mesh) -> Any:
    """NamedShardings from a tree of logical PartitionSpecs (`model.logical_axes`, `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical, mesh, RULES)


def state_shardings(cfg: ModelConfig, mesh: Mesh, tx: Any) -> TrainState:
    """The sharding of every leaf of a TrainState. The optimizer state is made (abstractly) of the parameters in
    their logical-axis boxes, so its moments keep the parameters' names; step counts are replicated."""
    abstract = jax.eval_shape(lambda boxed: TrainState(jnp.zeros((), jnp.int32), boxed, tx.init(boxed)),
                              boxed_params(cfg))
    # A transformation of some leaves only (Muon's and AdamW's groups: optax.masked) boxes a placeholder, no array,
    # where the other leaves are: the placeholder alone, as the unboxed state has it.
    abstract = jax.tree.map(lambda x: x.unbox() if _boxes_nothing(x) else x, abstract, is_leaf=_is_box)
    return logical_shardings(nn.get_partition_spec(abstract), mesh)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _boxes_nothing(x: Any) -> bool:
    return _is_box(x) and not jax.tree_util.tree_leaves(x.unbox())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch laid out as (micro-batches, rows, tokens): every micro-batch's rows over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH))


def rows_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """An evaluation batch (rows, tokens): rows split where the devices can share them, else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH) if rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
                         else PartitionSpec())


def device_batch(tokens: np.ndarray, starts: np.ndarray, context_length: int, sharding: NamedSharding) -> jax.Array:
    """The windows at `starts` ((rows,) or (micro-batches, rows) offsets into `tokens`) as one global array of
    shape (*starts.shape, context_length + 1), of which this process gathers only the windows its devices hold."""
    def piece(index: tuple) -> np.ndarray:
        part = starts[index[:starts.ndim]]
        return gather(tokens, part.ravel(), context_length).reshape(*part.shape, context_length + 1)

    return jax.make_array_from_callback((*starts.shape, context_length + 1), sharding, piece)


def put(tree: Any, shardings: Any) -> Any:
    """Values every process holds whole (NumPy or single-device arrays, keys included) as global arrays laid out
    by `shardings` (a tree, or one sharding for all): jax.device_put cannot place a host value on other
    processes' devices; each process makes the pieces its own devices hold. The result is copied into buffers of
    XLA's own: on a CPU the pieces may alias the host memory, and the train step donates the state it is given
    (donated host memory corrupted the heap with jax 0.5.0, as restored buffers did: checkpoint.py)."""
    def one(x: Any, where: NamedSharding) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a key: its data, placed, wrapped again
            return jax.random.wrap_key_data(one(jax.random.key_data(x), where))
        host = np.asarray(x)
        return jnp.copy(jax.make_array_from_callback(host.shape, where, lambda index: host[index]))

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def place_rows(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds whole, as a global array with its rows split where they can be."""
    return jax.make_array_from_callback(array.shape, rows_sharding(mesh, len(array)), lambda index: array[index])


def device_windows(tokens: np.ndarray, starts: np.ndarray, context_length: int, mesh: Mesh) -> jax.Array:
    """An evaluation batch: the windows at `starts`, split over the devices where they can share them."""
    return device_batch(tokens, starts, context_length, rows_sharding(mesh, len(starts)))


def model_on(mesh: Mesh, cfg: ModelConfig, backend: Any) -> GPT:
    """The model as a mesh runs it: on several devices its residual stream and logits are laid out by their
    logical names; on one, nothing is added to its program."""
    return GPT(cfg, backend, activation_constraint(mesh)) if mesh.size > 1 else GPT(cfg, backend)


def activation_constraint(mesh: Mesh) -> Callable[[jax.Array, tuple[str, ...]], jax.Array]:
    """The model's hook for its residual stream and logits: lay `x` out by its logical axis names."""

    def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, _named(mesh, names))

    return constrain


@functools.cache
def _named(mesh: Mesh, names: tuple[str, ...]) -> NamedSharding:
    return nn.logical_to_mesh_sharding(PartitionSpec(*names), mesh, RULES)


def shard_bytes(tree: Any) -> int:
    """The bytes one device holds of the arrays of `tree` (arrays or ShapeDtypeStructs with shardings): the
    largest over devices, for trees split unevenly."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * np.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)
