"""Meshes, the logical-axis rules table, born-sharded model initialisation and batch sharding.

Mesh: axes ('data', 'expert') from a `MeshConfig` (1x8, 2x4 and 8x1 on eight devices are all valid). Tokens
(the batch dim) are split over both axes; experts over 'expert'; every other kernel FSDP-style over the devices
its dims leave free; small vectors replicated.

One sharding mode, project-wide: every mesh axis is `AxisType.Auto` (`SHARDING_MODE`). Parameters and batches
are placed explicitly with `NamedSharding`s derived from the rules table, and the compiler (GSPMD) propagates
through the model code, which therefore needs no per-op sharding annotations. The one hand-partitioned region
is the expert-parallel MoE (`model/expert_parallel.py`), a `jax.shard_map` whose in/out specs gather the FSDP
shards and split tokens and experts. Code that traces the model under a mesh does so inside
`with jax.set_mesh(mesh):`; the expert-parallel MoE and `constrain_batch` read that ambient mesh.

Parameters carry logical axis names as `logical_axes` Variable metadata (stacked layers add a leading 'layers');
LoRA adapters inherit theirs from the kernel they adapt (a: kernel's batch + in axes, 'lora_rank';
b: batch axes, 'lora_rank', out axes), so expert adapters shard on 'expert' like the expert weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
EXPERT_AXIS = "expert"
MESH_AXES = (DATA_AXIS, EXPERT_AXIS)
SHARDING_MODE = AxisType.Auto

# logical axis -> candidate mesh axes, in priority order. Logical axes are resolved in the order of this table
# (so 'expert' claims its mesh axis before 'embed' looks for free ones); a mesh axis is used at most once per
# array, and only while the product of the chosen axis sizes divides the dimension (otherwise it is skipped).
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expert", (EXPERT_AXIS,)),             # expert parallelism: E/M experts per 'expert' shard
    ("vocab", (DATA_AXIS, EXPERT_AXIS)),    # the (tied) embedding: vocab-parallel lookup and logits
    ("embed", (DATA_AXIS, EXPERT_AXIS)),    # FSDP: the model dim of every other kernel, over the free axes
    ("layers", ()),                         # scanned repeats: each scan step reads one whole slice
    ("mlp", ()),
    ("expert_mlp", ()),
    ("heads", ()),
    ("kv_heads", ()),
    ("head_dim", ()),
    ("expert_logits", ()),                  # router columns, per-expert scale: small, replicated
    ("norm", ()),
    ("lora_rank", ()),
)


class ShardingError(ValueError):
    """A mesh or sharding request that cannot work; the message names the offending value."""


# ------------------------------------------------------------------------------------------------------ meshes
@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the ('data', 'expert') mesh axes; one of them may be -1 ("all remaining devices"). The default
    puts every device on 'expert' (the released model: 8 accelerators holding 16 experts each)."""

    data: int = 1
    expert: int = -1

    def shape(self, num_devices: int) -> tuple[int, int]:
        sizes = (self.data, self.expert)
        for name, size in zip(MESH_AXES, sizes):
            if not isinstance(size, int) or isinstance(size, bool) or (size <= 0 and size != -1):
                raise ShardingError(f"MeshConfig.{name} must be a positive integer or -1, got {size!r}")
        if sizes.count(-1) > 1:
            raise ShardingError("MeshConfig: at most one axis may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(f"MeshConfig {sizes}: {num_devices} devices are not divisible by {known}")
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ShardingError(f"MeshConfig data={sizes[0]} x expert={sizes[1]} needs {math.prod(sizes)} devices, "
                                f"{num_devices} are available")
        return sizes


def make_mesh(config: MeshConfig = MeshConfig(), devices: Iterable[jax.Device] | None = None) -> Mesh:
    """The ('data', 'expert') mesh over `devices` (default: all), every axis in `SHARDING_MODE`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(SHARDING_MODE,) * len(MESH_AXES), devices=devices)


def check_expert_split(num_experts: int, mesh_shape: dict[str, int], expert_axis: str = EXPERT_AXIS) -> None:
    """The expert-parallel MoE gives each device on `expert_axis` whole experts: their number must divide."""
    shards = mesh_shape.get(expert_axis, 1)
    if num_experts % shards:
        raise ShardingError(f"{num_experts} experts cannot be split over the {expert_axis!r} mesh axis of size "
                            f"{shards} (set mesh.expert to a divisor of {num_experts})")


# ------------------------------------------------------------------------------------------------------ rules
def logical_to_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    rules: tuple[tuple[str, tuple[str, ...]], ...] = LOGICAL_AXIS_RULES) -> P:
    """The PartitionSpec of an array with these logical axes (None: an unnamed, replicated dim)."""
    if len(logical_axes) != len(shape):
        raise ShardingError(f"logical axes {logical_axes} do not match shape {shape}")
    table = dict(rules)
    priority = {name: i for i, (name, _) in enumerate(rules)}
    for name in logical_axes:
        if name is not None and name not in table:
            raise ShardingError(f"logical axis {name!r} has no entry in the sharding rules table")
    spec: list[Any] = [None] * len(shape)
    used: set[str] = set()
    named = [i for i, name in enumerate(logical_axes) if name is not None]
    for dim in sorted(named, key=lambda i: priority[logical_axes[i]]):
        chosen: list[str] = []
        for axis in table[logical_axes[dim]]:
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1 or shape[dim] % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec[dim] = None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen)
    while spec and spec[-1] is None:  # canonical form: jit returns P() for P(None, None), and its cache
        spec.pop()                    # would otherwise compile a step twice
    return P(*spec)


def logical_axes(model: nnx.Module) -> dict[tuple, tuple[str | None, ...]]:
    """Logical axes of every Variable of `model`, keyed by its path in `nnx.state(model)`. A parameter without
    `logical_axes` metadata must be a LoRA factor (axes derived from its kernel); other variables without them
    (e.g. sown intermediates) are replicated."""
    variables = {path: v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    out = {}
    for path, variable in variables.items():
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            axes = _lora_axes(path, variable, variables)
        if axes is None:
            if isinstance(variable, nnx.Param) and np.ndim(variable.get_value()) != 0:
                raise ShardingError(f"parameter {'/'.join(map(str, path))} of shape {variable.shape} has no "
                                    "logical_axes metadata")
            axes = (None,) * np.ndim(variable.get_value())
        out[path] = tuple(axes)
    return out


def _lora_axes(path, variable, variables) -> tuple | None:
    """`<kernel>_lora/{a, b}`: a [*batch, *in, r] and b [*batch, r, *out] follow the adapted kernel's axes."""
    if len(path) < 2 or path[-1] not in ("a", "b") or not str(path[-2]).endswith("_lora"):
        return None
    kernel = variables.get(path[:-2] + (str(path[-2])[: -len("_lora")],))
    if kernel is None or "logical_axes" not in kernel.get_metadata():
        return None
    kernel_axes = tuple(kernel.get_metadata()["logical_axes"])
    a = variables.get(path[:-1] + ("a",))
    leading = np.ndim(a.get_value()) - 1  # batch + in dims, a prefix of the kernel's
    if path[-1] == "a":
        return kernel_axes[:leading] + ("lora_rank",)
    batch = np.ndim(variable.get_value()) - 1 - (len(kernel_axes) - leading)
    return kernel_axes[:batch] + ("lora_rank",) + kernel_axes[leading:]


def state_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """`nnx.state(model)` with every Variable's value replaced by its NamedSharding (works on abstract models)."""
    axes = logical_axes(model)
    flat = [(path, variable.replace(NamedSharding(mesh, logical_to_spec(axes[path], variable.shape, mesh))))
            for path, variable in nnx.to_flat_state(nnx.state(model))]
    return nnx.from_flat_state(flat)


def sharded_initializer(make_model: Callable[[], nnx.Module], mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, jitted function -> the model's state), the state's arrays produced directly in their
    shardings. `init_sharded` runs it; `.lower().compile().memory_analysis()` shows the per-device footprint."""
    abstract = nnx.eval_shape(make_model)
    graphdef, _ = nnx.split(abstract)
    return graphdef, jax.jit(lambda: nnx.state(make_model()), out_shardings=state_shardings(abstract, mesh))


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Build `make_model()` with every array born in its sharding: one jitted initialisation whose outputs are
    the shards, so no device ever holds a whole sharded parameter. E.g.
    `init_sharded(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)), mesh)`."""
    graphdef, create = sharded_initializer(make_model, mesh)
    return nnx.merge(graphdef, create())


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move an existing model's arrays (e.g. from `load_hf`) to their shardings, in place; returns the model."""
    state = nnx.state(model)
    shardings = jax.tree.leaves(state_shardings(model, mesh))
    placed = [jax.device_put(x, s) for x, s in zip(jax.tree.leaves(state), shardings)]
    nnx.update(model, jax.tree.unflatten(jax.tree.structure(state), placed))
    return model


# ----------------------------------------------------------------------------------------------------- batches
def batch_axes(mesh: Mesh | jax.sharding.AbstractMesh, batch_size: int) -> tuple[str, ...]:
    """Mesh axes the leading (batch or token) dim is split over: every axis, in mesh order, while the product
    of their sizes divides `batch_size` (axes that would not divide are left replicated)."""
    chosen: list[str] = []
    for axis in mesh.axis_names:
        size = mesh.shape[axis]
        if size > 1 and batch_size % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
            chosen.append(axis)
    return tuple(chosen)


def batch_spec(mesh: Mesh | jax.sharding.AbstractMesh, shape: tuple[int, ...]) -> P:
    """PartitionSpec of a batch-major array: the leading dim over `batch_axes`, the rest replicated."""
    if not shape:
        return P()
    axes = batch_axes(mesh, shape[0])
    return P(axes if axes else None)


def process_batch_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch that this process's devices hold under `batch_spec`: what its input
    pipeline must load so that the global batch, assembled with `jax.make_array_from_process_local_data`, has
    the same rows in the same order as a single-process run's (all rows when the batch is replicated)."""
    sharding = NamedSharding(mesh, batch_spec(mesh, (batch_size,)))
    blocks = sorted({index[0].indices(batch_size)[:2]
                     for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
    if not blocks:
        raise ShardingError(f"process {jax.process_index()} has no device in the mesh")
    start, stop = blocks[0]
    for block_start, block_stop in blocks[1:]:
        if block_start > stop:
            raise ShardingError(f"process {jax.process_index()} holds rows {blocks} of the batch of {batch_size}, "
                                "not one contiguous block: order the mesh's devices process by process")
        stop = max(stop, block_stop)
    return start, stop


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every array of a (pytree) batch with its leading dim split over the mesh (`batch_spec`)."""
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec(mesh, np.shape(x)))), batch)


def gather_whole(x: jax.Array) -> jax.Array:
    """Inside a trace under `jax.set_mesh`: a weight gathered whole on every device (FSDP's gather before use).
    A no-op without an ambient mesh or inside `shard_map`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, P())


def constrain_batch(x: jax.Array) -> jax.Array:
    """Inside a trace under `jax.set_mesh`: pin a batch-major activation to `batch_spec` so the compiler keeps
    activations data-parallel and gathers FSDP weights instead. A no-op without an ambient mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, batch_spec(mesh, x.shape))
