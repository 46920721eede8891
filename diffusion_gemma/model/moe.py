"""Mixture of experts: router and experts, with a grouped (`ragged_dot`) path and a dense oracle.

Routing (reference): z = rmsnorm_noscale(r) * scale * D^-0.5; softmax(z @ Wr) in fp32; exact top-k;
renormalise the k weights to sum 1; multiply by per_expert_scale[expert]. Experts: gate_up [E, D, 2*Ie]
(first half gate, second half up), down [E, Ie, D]; out = sum_k w_k * down_k(gelu_tanh(gate_k) * up_k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_gemma.model.layers import gelu_tanh, init_normal, rms_norm


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


def experts_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                  down: jax.Array) -> jax.Array:
    """Oracle: every expert on every token, combined with the scattered routing weights. O(T * E) work."""
    num_experts = gate_up.shape[0]
    hidden = jnp.einsum("td,edf->tef", x, gate_up.astype(x.dtype))
    gate, up = jnp.split(hidden, 2, axis=-1)
    out = jnp.einsum("tei,eid->ted", gelu_tanh(gate) * up, down.astype(x.dtype))
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("te,ted->td", combine, out.astype(jnp.float32)).astype(x.dtype)


def experts_grouped(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                    down: jax.Array) -> jax.Array:
    """Sort the T*k assignments by expert and run two grouped matmuls (`ragged_dot`); dropless."""
    num_tokens, top_k = experts.shape
    num_experts = gate_up.shape[0]
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    tokens = order // top_k
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    sorted_x = jnp.take(x, tokens, axis=0)
    hidden = jax.lax.ragged_dot(sorted_x, gate_up.astype(x.dtype), group_sizes)
    gate, up = jnp.split(hidden, 2, axis=-1)
    sorted_out = jax.lax.ragged_dot(gelu_tanh(gate) * up, down.astype(x.dtype), group_sizes)
    unsorted = jnp.zeros_like(sorted_out).at[order].set(sorted_out).reshape(num_tokens, top_k, -1)
    return jnp.einsum("tk,tkd->td", weights, unsorted.astype(jnp.float32)).astype(x.dtype)


EXPERT_IMPLEMENTATIONS = {"dense": experts_dense, "grouped": experts_grouped}


class MoE(nnx.Module):
    def __init__(self, *, hidden_size: int, num_experts: int, top_k: int, expert_dim: int, eps: float, std: float,
                 param_dtype, impl: str, rngs: nnx.Rngs):
        self.top_k = top_k
        self.eps = eps
        self.impl = impl
        self.router_proj = nnx.Param(init_normal(rngs, (hidden_size, num_experts), std, param_dtype),
                                     logical_axes=("embed", "expert_logits"))
        self.router_scale = nnx.Param(jnp.ones((hidden_size,), param_dtype), logical_axes=("norm",))
        self.per_expert_scale = nnx.Param(jnp.ones((num_experts,), param_dtype), logical_axes=("expert_logits",))
        self.gate_up_proj = nnx.Param(init_normal(rngs, (num_experts, hidden_size, 2 * expert_dim), std, param_dtype),
                                      logical_axes=("expert", "embed", "expert_mlp"))
        self.down_proj = nnx.Param(init_normal(rngs, (num_experts, expert_dim, hidden_size), std, param_dtype),
                                   logical_axes=("expert", "expert_mlp", "embed"))

    def __call__(self, residual: jax.Array, normed: jax.Array) -> jax.Array:
        """residual [B, S, D] feeds the router; normed [B, S, D] (pre_feedforward_layernorm_2) the experts."""
        shape = residual.shape
        weights, experts = route(residual.reshape(-1, shape[-1]), self.router_proj[...], self.router_scale[...],
                                 self.per_expert_scale[...], top_k=self.top_k, eps=self.eps)
        out = EXPERT_IMPLEMENTATIONS[self.impl](normed.reshape(-1, shape[-1]), weights, experts,
                                                self.gate_up_proj[...], self.down_proj[...])
        return out.reshape(shape)
