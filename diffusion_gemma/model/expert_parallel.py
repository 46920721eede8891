"""Expert-parallel MoE: one MoE layer inside `jax.shard_map`, as a pure function of arrays.

Finding the mesh: `moe_expert_parallel` uses `mesh=` when given, else the ambient mesh set with
`jax.set_mesh(mesh)` (read at trace time with `jax.sharding.get_abstract_mesh()`); it must have an 'expert'
axis (`diffusion_gemma.sharding.make_mesh` builds ('data', 'expert')). Without one it raises; the 'grouped' and
'dense' implementations never need a mesh.

Layout inside the shard_map: tokens are split over every mesh axis (T_l per device; the token count is padded
to a multiple of the device count with masked rows); expert weights are split over 'expert' only (E_l = E / M
local experts, M = size of 'expert'), so FSDP shards on other axes are all-gathered at the boundary; router
weights are replicated. Devices that share a 'data' index form one expert group and exchange tokens among
themselves.

Per device:
  1. route the local tokens; pad tokens (token_mask False) get no expert, so they take no capacity;
  2. sort the T_l*k assignments by expert, hence by owning device (expert // E_l);
  3. exchange, grouped matmul (`ragged_dot`) over the E_l local experts, exchange back:
     'all_to_all' (default; runs on CPU): each destination gets a [C, D] slot block of a [M, C, D] buffer plus
       the local expert id of every slot; one `all_to_all` there and one back. C = T_l * min(k, E_l) is dropless
       (the most one device can send another). With a capacity factor f, C = ceil(f * T_l * k / M) and the
       assignments past C for a destination (higher expert ids and later tokens first) are dropped: their
       output is 0 and they are counted.
     'ragged' (GPU/TPU; XLA:CPU has no `ragged_all_to_all`): `ragged_all_to_all` sends exactly the routed rows
       into a worst-case receive buffer [M * T_l * min(k, E_l), D]; always dropless.
  4. un-sort and combine the k expert outputs of each token with the routing weights (fp32).
Communication per layer and device: forward, 2 exchanges of M*C*D activations ('all_to_all') or of the T_l*k
routed rows ('ragged') along 'expert', plus an all-gather of the routing counts (ragged); the backward pass
transposes each exchange into the same exchange in reverse. The dropped count is `psum`med over the mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from diffusion_gemma.model.moe_ops import combine, grouped_ffn, mask_assignments, route
from diffusion_gemma import sharding
from diffusion_gemma.sharding import EXPERT_AXIS

DISPATCHES = ("all_to_all", "ragged")
# Module-level so that CPU tests can substitute an emulation (XLA:CPU cannot compile the real collective).
ragged_all_to_all = jax.lax.ragged_all_to_all


def expert_capacity(local_tokens: int, top_k: int, local_experts: int, expert_shards: int,
                    capacity_factor: float | None) -> int:
    """Slots per (source, destination) device pair of the 'all_to_all' exchange. None: dropless bound."""
    dropless = local_tokens * min(top_k, local_experts)
    if capacity_factor is None:
        return dropless
    return max(1, min(dropless, math.ceil(capacity_factor * local_tokens * top_k / expert_shards)))


def moe_expert_parallel(residual: jax.Array, normed: jax.Array, token_mask: jax.Array | None,
                        router_proj: jax.Array, router_scale: jax.Array, per_expert_scale: jax.Array,
                        gate_up: jax.Array, down: jax.Array, *, top_k: int, eps: float, dispatch: str = "all_to_all",
                        capacity_factor: float | None = None, mesh=None,
                        expert_axis: str = EXPERT_AXIS) -> tuple[jax.Array, jax.Array]:
    """The MoE layer over the mesh. residual/normed [T, D], token_mask [T] bool or None, router_proj [D, E],
    router_scale [D], per_expert_scale [E], gate_up [E, D, 2*Ie], down [E, Ie, D] (global arrays, any
    sharding). Returns (output [T, D], dropped assignments: replicated int32 scalar)."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if dispatch == "ragged" and capacity_factor is not None:
        raise ValueError("the ragged dispatch is always dropless; capacity_factor must be None")
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or expert_axis not in mesh.axis_names:
        raise ValueError(f"the expert-parallel MoE needs a mesh with an {expert_axis!r} axis: build one with "
                         f"diffusion_gemma.sharding.make_mesh and trace under `with jax.set_mesh(mesh):` "
                         f"(current mesh: {mesh})")
    expert_shards = mesh.shape[expert_axis]
    sharding.check_expert_split(gate_up.shape[0], dict(mesh.shape), expert_axis)
    num_tokens = residual.shape[0]
    if token_mask is None:
        token_mask = jnp.ones((num_tokens,), bool)
    padded = -(-num_tokens // mesh.size) * mesh.size
    if padded != num_tokens:
        extra = padded - num_tokens
        residual, normed = (jnp.pad(a, ((0, extra), (0, 0))) for a in (residual, normed))
        token_mask = jnp.pad(token_mask.astype(bool), (0, extra))

    token_axes = tuple(mesh.axis_names)
    tokens = P(token_axes)
    local = functools.partial(_local_moe, top_k=top_k, eps=eps, dispatch=dispatch, capacity_factor=capacity_factor,
                              expert_axis=expert_axis, expert_shards=expert_shards, token_axes=token_axes)
    out, dropped = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, P(), P(), P(), P(expert_axis), P(expert_axis)),
        out_specs=(tokens, P()))(residual, normed, token_mask.astype(bool), router_proj, router_scale,
                                 per_expert_scale, gate_up, down)
    return out[:num_tokens], dropped


def _local_moe(residual, normed, token_mask, router_proj, router_scale, per_expert_scale, gate_up, down, *, top_k,
               eps, dispatch, capacity_factor, expert_axis, expert_shards, token_axes):
    """One device's share: T_l tokens, E_l experts."""
    local_experts = gate_up.shape[0]
    weights, experts = route(residual, router_proj, router_scale, per_expert_scale, top_k=top_k, eps=eps)
    weights, experts = mask_assignments(weights, experts, token_mask, local_experts * expert_shards)
    if dispatch == "all_to_all":
        capacity = expert_capacity(residual.shape[0], top_k, local_experts, expert_shards, capacity_factor)
        expert_out, dropped = _exchange_all_to_all(normed, experts, gate_up, down, capacity=capacity,
                                                   axis=expert_axis, shards=expert_shards)
    else:
        expert_out = _exchange_ragged(normed, experts, gate_up, down, axis=expert_axis, shards=expert_shards)
        dropped = jnp.zeros((), jnp.int32)
    return combine(weights, expert_out, normed.dtype), jax.lax.psum(dropped, token_axes)


def _sort_by_expert(experts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """experts [T, k] -> (order [T*k]: assignment indices sorted by expert, stable; the sorted expert ids)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, jnp.take(flat, order)


def _unsort(sorted_rows: jax.Array, order: jax.Array, num_tokens: int, top_k: int) -> jax.Array:
    """Rows in sorted-assignment order -> [T, k, D] in token order."""
    rows = jnp.zeros_like(sorted_rows).at[order].set(sorted_rows)
    return rows.reshape(num_tokens, top_k, -1)


def _exchange_all_to_all(x, experts, gate_up, down, *, capacity: int, axis: str, shards: int):
    """x [T_l, D], experts [T_l, k] (global ids; E = no expert) -> (expert outputs [T_l, k, D], dropped)."""
    num_tokens, top_k = experts.shape
    local_experts = gate_up.shape[0]
    order, sorted_experts = _sort_by_expert(experts)
    destination = sorted_experts // local_experts  # == shards for pad tokens' assignments
    counts = jnp.bincount(destination, length=shards)  # [M] assignments per destination
    starts = jnp.cumsum(counts) - counts

    slot = jnp.arange(capacity)
    filled = slot[None, :] < counts[:, None]  # [M, C]
    position = jnp.where(filled, starts[:, None] + slot[None, :], 0)  # [M, C] index into the sorted assignments
    send_rows = jnp.where(filled[..., None], jnp.take(x, jnp.take(order, position) // top_k, axis=0), 0)
    send_ids = jnp.where(filled, jnp.take(sorted_experts, position) % local_experts, local_experts)

    # [M, C, ...]: block d goes to device d; the result's block s came from device s.
    recv_rows = jax.lax.all_to_all(send_rows, axis, 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids, axis, 0, 0, tiled=True)
    out_rows = grouped_ffn(recv_rows.reshape(shards * capacity, -1), recv_ids.reshape(-1), gate_up, down)
    back = jax.lax.all_to_all(out_rows.reshape(shards, capacity, -1), axis, 0, 0, tiled=True)

    rank = jnp.arange(order.shape[0]) - jnp.take(starts, jnp.minimum(destination, shards - 1))
    kept = (destination < shards) & (rank < capacity)
    slot_index = jnp.where(kept, destination * capacity + rank, 0)
    sorted_out = jnp.where(kept[:, None], jnp.take(back.reshape(shards * capacity, -1), slot_index, axis=0), 0)
    dropped = jnp.sum(jnp.maximum(counts - capacity, 0)).astype(jnp.int32)
    return _unsort(sorted_out, order, num_tokens, top_k), dropped


def _exchange_ragged(x, experts, gate_up, down, *, axis: str, shards: int):
    """Dropless exchange of exactly the routed rows with `ragged_all_to_all` -> expert outputs [T_l, k, D]."""
    num_tokens, top_k = experts.shape
    local_experts = gate_up.shape[0]
    order, sorted_experts = _sort_by_expert(experts)
    sorted_rows = jnp.take(x, order // top_k, axis=0)  # pad tokens' assignments sort last and are never sent

    per_expert = jnp.bincount(sorted_experts, length=shards * local_experts).reshape(shards, local_experts)
    send_sizes = jnp.sum(per_expert, axis=1).astype(jnp.int32)  # [M] rows to each destination
    input_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
    everyone = jax.lax.all_gather(per_expert, axis)  # [M source, M destination, E_l]
    me = jax.lax.axis_index(axis)
    received = everyone[:, me].astype(jnp.int32)  # [M source, E_l] rows I get, per local expert
    recv_sizes = jnp.sum(received, axis=1)
    pair = jnp.sum(everyone, axis=-1)  # [M source, M destination]
    # On each destination, the rows of lower-numbered sources come first.
    output_offsets = (jnp.cumsum(pair, axis=0) - pair)[me].astype(jnp.int32)
    recv_offsets = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)

    buffer_rows = shards * num_tokens * min(top_k, local_experts)
    recv_rows = ragged_all_to_all(sorted_rows, jnp.zeros((buffer_rows, x.shape[-1]), x.dtype), input_offsets,
                                  send_sizes, output_offsets, recv_sizes, axis_name=axis)
    # Received rows: by source, then by local expert; the unused tail gets the "no expert" id E_l.
    segment_experts = jnp.append(jnp.tile(jnp.arange(local_experts, dtype=jnp.int32), shards), local_experts)
    segment_sizes = jnp.append(received.reshape(-1), buffer_rows - jnp.sum(recv_sizes))
    recv_ids = jnp.repeat(segment_experts, segment_sizes, total_repeat_length=buffer_rows)
    out_rows = grouped_ffn(recv_rows, recv_ids, gate_up, down)

    # Back to where each source keeps those rows: source s's input offset for me.
    source_offsets = jax.lax.all_to_all(input_offsets, axis, 0, 0, tiled=True)
    back = ragged_all_to_all(out_rows, jnp.zeros_like(sorted_rows), recv_offsets, recv_sizes, source_offsets,
                             send_sizes, axis_name=axis)
    sent = (sorted_experts < shards * local_experts)[:, None]
    return _unsort(jnp.where(sent, back, 0), order, num_tokens, top_k)
