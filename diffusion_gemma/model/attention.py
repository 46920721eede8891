"""Sliding and full attention of one layer, shared by the causal encoder and the bidirectional decoder.

Full layers have no value projection: v = v_norm(k_raw) taken before k_norm and RoPE ("k as v").
Scores use scale 1.0 and no softcap; masks are boolean and applied with the dtype's most negative finite value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_gemma.model.layers import RMSNorm, apply_rope, init_normal, rms_norm
from diffusion_gemma.model.lora import effective_kernel


def masked_attention(query: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Grouped-query attention with scale 1.0.

    query [B, Q, N, hd], keys/values [B, T, Kv, hd], visible [B, Q, T] bool -> [B, Q, N, hd].
    Query head n reads kv head n // (N / Kv). Softmax in fp32, as the reference.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv = keys.shape[2]
    grouped = query.reshape(batch, q_len, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("bqkgh,btkh->bkgqt", grouped, keys)
    min_value = jnp.finfo(scores.dtype).min
    scores = jnp.where(visible[:, None, None, :, :], scores, min_value)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(query.dtype)
    out = jnp.einsum("bkgqt,btkh->bqkgh", probs, values)
    return out.reshape(batch, q_len, num_heads, head_dim)


class Attention(nnx.Module):
    """q/k/v/o projections stored as [D, heads, hd] / [heads, hd, D] kernels."""

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, is_sliding: bool,
                 eps: float, std: float, param_dtype, rngs: nnx.Rngs):
        self.is_sliding = is_sliding
        self.eps = eps
        self.q_proj = nnx.Param(init_normal(rngs, (hidden_size, num_heads, head_dim), std, param_dtype),
                                logical_axes=("embed", "heads", "head_dim"))
        self.k_proj = nnx.Param(init_normal(rngs, (hidden_size, num_kv_heads, head_dim), std, param_dtype),
                                logical_axes=("embed", "kv_heads", "head_dim"))
        self.v_proj = (nnx.Param(init_normal(rngs, (hidden_size, num_kv_heads, head_dim), std, param_dtype),
                                 logical_axes=("embed", "kv_heads", "head_dim")) if is_sliding else None)
        self.o_proj = nnx.Param(init_normal(rngs, (num_heads, head_dim, hidden_size), std, param_dtype),
                                logical_axes=("heads", "head_dim", "embed"))
        self.q_norm = RMSNorm(head_dim, eps=eps, param_dtype=param_dtype, logical_axes=("head_dim",))
        self.k_norm = RMSNorm(head_dim, eps=eps, param_dtype=param_dtype, logical_axes=("head_dim",))

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, S, D] (already input-normed) -> q [B,S,N,hd], k [B,S,Kv,hd] (normed + RoPE), v [B,S,Kv,hd]."""
        dtype = x.dtype
        query = jnp.einsum("bsd,dnh->bsnh", x, effective_kernel(self, "q_proj").astype(dtype))
        query = apply_rope(self.q_norm(query), cos, sin)
        key_raw = jnp.einsum("bsd,dkh->bskh", x, effective_kernel(self, "k_proj").astype(dtype))
        value_raw = (jnp.einsum("bsd,dkh->bskh", x, effective_kernel(self, "v_proj").astype(dtype))
                     if self.v_proj is not None else key_raw)
        key = apply_rope(self.k_norm(key_raw), cos, sin)
        value = rms_norm(value_raw, None, self.eps)
        return query, key, value

    def output(self, attended: jax.Array) -> jax.Array:
        return jnp.einsum("bsnh,nhd->bsd", attended, effective_kernel(self, "o_proj").astype(attended.dtype))
