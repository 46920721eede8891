"""The mixture-of-experts math as pure functions of arrays, shared by the MoE layer (`moe.py`) and its
expert-parallel path (`expert_parallel.py`), so that every implementation routes and combines the same way.

Routing (reference): z = rmsnorm_noscale(r) * scale * D^-0.5; softmax(z @ Wr) in fp32; exact top-k;
renormalise the k weights to sum 1; multiply by per_expert_scale[expert]. Experts: gate_up [E, D, 2*Ie]
(first half gate, second half up), down [E, Ie, D]; out = sum_k w_k * down_k(gelu_tanh(gate_k) * up_k).

Pad tokens (`token_mask` False) get the sentinel expert id E ("no expert"): no grouped-matmul rows, no exchange
capacity, and an MoE output of 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_gemma.model.grouped_matmul import grouped_matmul
from diffusion_gemma.model.layers import gelu_tanh, rms_norm


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
