"""Mixture of experts: router and experts, with a dense oracle, a grouped (`ragged_dot`) path and the
expert-parallel paths of `expert_parallel.py`; `ModelConfig.moe_impl` picks one, and all give the same outputs.

Routing (reference): z = rmsnorm_noscale(r) * scale * D^-0.5; softmax(z @ Wr) in fp32; exact top-k;
renormalise the k weights to sum 1; multiply by per_expert_scale[expert]. Experts: gate_up [E, D, 2*Ie]
(first half gate, second half up), down [E, Ie, D]; out = sum_k w_k * down_k(gelu_tanh(gate_k) * up_k).

Pad tokens (`token_mask` False) are excluded from routing in every implementation: they get no expert, take no
grouped-matmul rows or exchange capacity, and their MoE output is 0. Real tokens are unaffected (routing is
per token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# expert_parallel imports this module's pure functions back; it only reads them at call time.
from diffusion_gemma.model import expert_parallel
from diffusion_gemma.model.grouped_matmul import grouped_matmul
from diffusion_gemma.model.layers import gelu_tanh, init_normal, rms_norm
from diffusion_gemma.model.lora import effective_kernel

def route(hidden: jax.Array, proj: jax.Array, scale: jax.Array, per_expert_scale: jax.Array, *, top_k: int,
          eps: float) -> tuple[jax.Array, jax.Array]:
    """hidden [T, D] (the raw residual) -> (weights [T, k] fp32, experts [T, k] int32)."""
    dim = hidden.shape[-1]
    z = rms_norm(hidden, None, eps) * scale.astype(hidden.dtype) * jnp.asarray(dim ** -0.5, hidden.dtype)
    logits = jnp.einsum("td,de->te", z, proj.astype(hidden.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * per_expert_scale.astype(jnp.float32)[experts]
    return weights, experts.astype(jnp.int32)


def mask_assignments(weights: jax.Array, experts: jax.Array, token_mask: jax.Array | None,
                     num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Pad tokens (token_mask [T] False) get weight 0 and the sentinel expert id `num_experts` ("no expert")."""
    if token_mask is None:
        return weights, experts
    keep = token_mask.astype(bool)[:, None]
    return jnp.where(keep, weights, 0.0), jnp.where(keep, experts, num_experts)


def grouped_ffn(rows: jax.Array, expert_ids: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """Each row through its own expert with two grouped matmuls (`ragged_dot`; on CPU the segment scan of
    `grouped_matmul`, which skips the G-times-larger masked matmul that XLA:CPU makes of `ragged_dot`).

    rows [N, D], expert_ids [N] in [0, G] with G = gate_up.shape[0]; id G means "no expert" and yields a zero row.
    gate_up [G, D, 2*Ie], down [G, Ie, D] -> [N, D].
    """
    num_groups = gate_up.shape[0]
    order = jnp.argsort(expert_ids, stable=True)  # "no expert" rows sort last, outside every group
    group_sizes = jnp.bincount(expert_ids, length=num_groups).astype(jnp.int32)
    sorted_rows = jnp.take(rows, order, axis=0)
    hidden = grouped_matmul(sorted_rows, gate_up.astype(rows.dtype), group_sizes)  # [N, 2*Ie]
    gate, up = jnp.split(hidden, 2, axis=-1)
    sorted_out = grouped_matmul(gelu_tanh(gate) * up, down.astype(rows.dtype), group_sizes)  # [N, D]
    out = jnp.zeros_like(sorted_out).at[order].set(sorted_out)
    # Rows outside every group are unspecified in some ragged_dot lowerings; make them exactly zero.
    return jnp.where((expert_ids < num_groups)[:, None], out, jnp.zeros((), out.dtype))


def combine(weights: jax.Array, expert_out: jax.Array, dtype) -> jax.Array:
    """Weighted sum over the k assignments of each token in fp32: weights [T, k], expert_out [T, k, D]."""
    return jnp.einsum("tk,tkd->td", weights, expert_out.astype(jnp.float32)).astype(dtype)


def experts_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                  down: jax.Array) -> jax.Array:
    """Oracle: every expert on every token, combined with the scattered routing weights. O(T * E) work."""
    num_experts = gate_up.shape[0]
    hidden = jnp.einsum("td,edf->tef", x, gate_up.astype(x.dtype))
    gate, up = jnp.split(hidden, 2, axis=-1)
    out = jnp.einsum("tei,eid->ted", gelu_tanh(gate) * up, down.astype(x.dtype))
    # The sentinel id E (pad tokens) one-hot encodes to an all-zero row.
    routing = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("te,ted->td", routing, out.astype(jnp.float32)).astype(x.dtype)


def experts_grouped(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                    down: jax.Array) -> jax.Array:
    """The T*k assignments sorted by expert through two grouped matmuls; dropless. Assignment t*k + j is
    token t's j-th choice."""
    num_tokens, top_k = experts.shape
    rows = jnp.repeat(x, top_k, axis=0)  # [T*k, D]
    out = grouped_ffn(rows, experts.reshape(-1), gate_up, down)
    return combine(weights, out.reshape(num_tokens, top_k, -1), x.dtype)


EXPERT_IMPLEMENTATIONS = {"dense": experts_dense, "grouped": experts_grouped}
EXPERT_PARALLEL_DISPATCH = {"expert_parallel": "all_to_all", "expert_parallel_ragged": "ragged"}


class MoE(nnx.Module):
    """Router + experts of one layer. Kernels are read through `effective_kernel`, so LoRA adapters work on the
    router and on the grouped expert weights (a [E, D, r], b [E, r, 2*Ie], sharded on the expert axis)."""

    def __init__(self, *, hidden_size: int, num_experts: int, top_k: int, expert_dim: int, eps: float, std: float,
                 param_dtype, impl: str, capacity_factor: float | None = None, rngs: nnx.Rngs):
        if impl not in EXPERT_IMPLEMENTATIONS and impl not in EXPERT_PARALLEL_DISPATCH:
            raise ValueError(f"unknown MoE implementation {impl!r}")
        self.top_k = top_k
        self.eps = eps
        self.impl = impl
        self.capacity_factor = capacity_factor
        self.router_proj = nnx.Param(init_normal(rngs, (hidden_size, num_experts), std, param_dtype),
                                     logical_axes=("embed", "expert_logits"))
        self.router_scale = nnx.Param(jnp.ones((hidden_size,), param_dtype), logical_axes=("norm",))
        self.per_expert_scale = nnx.Param(jnp.ones((num_experts,), param_dtype), logical_axes=("expert_logits",))
        self.gate_up_proj = nnx.Param(init_normal(rngs, (num_experts, hidden_size, 2 * expert_dim), std, param_dtype),
                                      logical_axes=("expert", "embed", "expert_mlp"))
        self.down_proj = nnx.Param(init_normal(rngs, (num_experts, expert_dim, hidden_size), std, param_dtype),
                                   logical_axes=("expert", "expert_mlp", "embed"))

    def __call__(self, residual: jax.Array, normed: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        return self.forward(residual, normed, token_mask)[0]

    def forward(self, residual: jax.Array, normed: jax.Array,
                token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """residual [B, S, D] feeds the router; normed [B, S, D] (pre_feedforward_layernorm_2) the experts;
        token_mask [B, S] (None: all real) excludes pad tokens. Returns (output [B, S, D], number of dropped
        (token, expert) assignments: an int32 scalar, 0 unless 'expert_parallel' runs with a capacity factor).
        The expert-parallel paths need a mesh (see `expert_parallel`)."""
        shape = residual.shape
        dim = shape[-1]
        tokens, normed_tokens = residual.reshape(-1, dim), normed.reshape(-1, dim)
        token_mask = None if token_mask is None else token_mask.reshape(-1)
        router_proj = effective_kernel(self, "router_proj")
        gate_up, down = effective_kernel(self, "gate_up_proj"), effective_kernel(self, "down_proj")
        if self.impl in EXPERT_PARALLEL_DISPATCH:
            out, dropped = expert_parallel.moe_expert_parallel(
                tokens, normed_tokens, token_mask, router_proj, self.router_scale[...], self.per_expert_scale[...],
                gate_up, down, top_k=self.top_k, eps=self.eps, dispatch=EXPERT_PARALLEL_DISPATCH[self.impl],
                capacity_factor=self.capacity_factor)
        else:
            weights, experts = route(tokens, router_proj, self.router_scale[...], self.per_expert_scale[...],
                                     top_k=self.top_k, eps=self.eps)
            weights, experts = mask_assignments(weights, experts, token_mask, gate_up.shape[0])
            out = EXPERT_IMPLEMENTATIONS[self.impl](normed_tokens, weights, experts, gate_up, down)
            dropped = jnp.zeros((), jnp.int32)
        return out.reshape(shape), dropped
