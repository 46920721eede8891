"""Mixture of experts, the layer: the router and expert parameters, and the choice of implementation
(`ModelConfig.moe_impl`): the dense oracle, the grouped (`ragged_dot`) path, or the expert-parallel paths of
`expert_parallel.py`. All give the same outputs; the math they share is in `moe_ops.py`.

Pad tokens (`token_mask` False) are excluded from routing in every implementation: they get no expert, take no
grouped-matmul rows or exchange capacity, and their MoE output is 0. Real tokens are unaffected (routing is
per token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_gemma import sharding
from diffusion_gemma.model import expert_parallel
from diffusion_gemma.model.layers import init_normal
from diffusion_gemma.model.lora import effective_kernel
from diffusion_gemma.model.moe_ops import experts_dense, experts_grouped, mask_assignments, route

# The router's parameters (attributes of `MoE`), which full SFT keeps frozen as the reference recipe does.
ROUTER_PARAMS = ("router_proj", "router_scale")

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
            # Data-parallel experts: every device runs its own tokens through all experts, so the FSDP-split expert
            # weights are gathered whole here (as FSDP gathers every kernel). Left to itself, the partitioner may
            # follow the weights' split of the model dim instead and gather the activations whole to reshard them.
            gate_up, down = sharding.gather_whole(gate_up), sharding.gather_whole(down)
            weights, experts = route(tokens, router_proj, self.router_scale[...], self.per_expert_scale[...],
                                     top_k=self.top_k, eps=self.eps)
            weights, experts = mask_assignments(weights, experts, token_mask, gate_up.shape[0])
            out = EXPERT_IMPLEMENTATIONS[self.impl](normed_tokens, weights, experts, gate_up, down)
            dropped = jnp.zeros((), jnp.int32)
        return out.reshape(shape), dropped
