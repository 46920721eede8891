"""Small building blocks: RMSNorm, rotary embeddings, scaled embedding, gated MLP.

Math lives in pure functions; the NNX modules only own parameters. Numerics follow the transformers reference:
norms and rotary angles in fp32, everything else in the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_gemma.config import GRID_AXES, GridRope, RopeConfig
from diffusion_gemma.model.lora import effective_kernel


class Buffer(nnx.Variable):
    """A constant saved with the checkpoint but never trained (e.g. `layer_scalar`)."""


def token_matmul(x: jax.Array, kernel: jax.Array, spec: str) -> jax.Array:
    """`jnp.einsum(f"...{spec}", x, kernel)` with the leading (batch, token) dims of x flattened into one: the same
    sums, but XLA:CPU emits the weight gradient of the batched einsum (a contraction over two leading dims) with a
    transposing copy of the activations or of the output gradient, which the 2-D form avoids (so the MLP and the
    tied LM head run faster forward and backward on CPU). `spec` names x's trailing feature dims,
    the kernel's and the output's, e.g. "d,df->f" or "nh,nhd->d"."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    lead = x.shape[:x.ndim - len(lhs)]
    y = jnp.einsum(f"t{lhs},{rhs}->t{out}", x.reshape(-1, *x.shape[len(lead):]), kernel)
    return y.reshape(*lead, *y.shape[1:])


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """x * (mean(x^2) + eps)^-0.5 [* weight], computed in fp32 and cast back (plain weight, not 1 + weight)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jnp.power(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps, -0.5)
    if weight is not None:
        normed = normed * weight.astype(jnp.float32)
    return normed.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies, shape [head_dim // 2], computed in fp32 exactly as the reference does.

    `proportional`: int(p * hd // 2) angles theta^(-2i/hd) (denominator: the FULL head dim), zeros for the rest.
    """
    if rope.rope_type == "proportional":
        angles = int(rope.partial_rotary_factor * head_dim // 2)
        exponents = np.arange(0, 2 * angles, 2, dtype=np.float32) / np.float32(head_dim)
        rotated = np.float32(1.0) / (np.float32(rope.theta) ** exponents)
        inv_freq = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, np.float32)])
    else:
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = np.float32(1.0) / (np.float32(rope.theta) ** exponents)
    return (inv_freq / np.float32(rope.factor)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, hd] for integer positions [B, S] ("rotate_half" layout: freqs repeated twice)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def grid_coordinates(positions: jax.Array, grid: GridRope) -> jax.Array:
    """int32 [..., len(GRID_AXES)]: (position, segment, row, col, block) of each 1-D position (`GridRope`).
    Positions before the first cell (the prefix, left pads) are segment 0 at row = col = block = 0."""
    positions = jnp.asarray(positions, jnp.int32)
    offset = positions - grid.prefix_length
    in_grid = offset >= 0
    cell = jnp.where(in_grid, offset % grid.cells, 0)
    segment = jnp.where(in_grid, 1 + offset // grid.cells, 0)
    row, col = cell // grid.cols, cell % grid.cols
    block = (row // grid.block_rows) * (grid.cols // grid.block_cols) + col // grid.block_cols
    return jnp.stack([positions, segment, row, col, block], axis=-1)


def grid_rope_frequencies(grid: GridRope, rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(axis [hd/2] int32: the GRID_AXES index each rotary pair turns with, inv_freq [hd/2] fp32: its angle per
    unit of that coordinate). Pairs go to the axes in contiguous groups; an axis of period P turns its k pairs
    by 2 pi j / P, j = 1..k; the position group takes `rope`'s own frequencies for 2k dims."""
    axes, freqs = [], []
    periods = grid.periods()
    for index, (name, pairs) in enumerate(zip(GRID_AXES, grid.pairs(head_dim))):
        if not pairs:
            continue
        axes.append(np.full(pairs, index, np.int32))
        if name == "position":
            freqs.append(rope_inv_freq(rope, 2 * pairs))
        else:
            freqs.append(np.float32(2 * np.pi) * np.arange(1, pairs + 1, dtype=np.float32) / np.float32(periods[name]))
    return np.concatenate(axes), np.concatenate(freqs).astype(np.float32)


def grid_rope_cos_sin(positions: jax.Array, grid: GridRope, rope: RopeConfig, head_dim: int,
                      dtype) -> tuple[jax.Array, jax.Array]:
    """`rope_cos_sin` for a geometry layer: pair i turns by inv_freq[i] times its axis's coordinate."""
    axes, inv_freq = grid_rope_frequencies(grid, rope, head_dim)
    coordinates = grid_coordinates(positions, grid).astype(jnp.float32)
    freqs = jnp.take(coordinates, jnp.asarray(axes), axis=-1) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, heads, hd]; pairs dim d with d + hd/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def init_normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, with_scale: bool = True, param_dtype=jnp.float32,
                 logical_axes=("norm",)):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=logical_axes) if with_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, None if self.weight is None else self.weight[...], self.eps)


class Embedder(nnx.Module):
    """Token embedding [V, D], also the tied output head."""

    def __init__(self, vocab_size: int, dim: int, *, std: float, param_dtype, rngs: nnx.Rngs):
        self.embed_scale = math.sqrt(dim)
        self.embedding = nnx.Param(init_normal(rngs, (vocab_size, dim), std, param_dtype),
                                   logical_axes=("vocab", "embed"))

    def encode(self, ids: jax.Array, dtype) -> jax.Array:
        """E[ids] * sqrt(D), the scale rounded to the compute dtype first (53.0 in bf16 for D = 2816)."""
        table = self.embedding[...].astype(dtype)
        return jnp.take(table, ids, axis=0) * jnp.asarray(self.embed_scale, dtype)

    def soft_encode(self, probs: jax.Array, dtype) -> jax.Array:
        """probs [B, C, V] @ E * sqrt(D): the expected embedding under a distribution."""
        table = self.embedding[...].astype(dtype)
        return token_matmul(probs.astype(dtype), table, "v,vd->d") * jnp.asarray(self.embed_scale, dtype)

    def decode(self, hidden: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(hidden.dtype)
        return token_matmul(hidden, table, "d,vd->v")


class GatedMLP(nnx.Module):
    """down(gelu_tanh(gate(x)) * up(x)); kernels stored [in, out]."""

    def __init__(self, dim: int, hidden: int, *, std: float, param_dtype, rngs: nnx.Rngs):
        self.gate_proj = nnx.Param(init_normal(rngs, (dim, hidden), std, param_dtype), logical_axes=("embed", "mlp"))
        self.up_proj = nnx.Param(init_normal(rngs, (dim, hidden), std, param_dtype), logical_axes=("embed", "mlp"))
        self.down_proj = nnx.Param(init_normal(rngs, (hidden, dim), std, param_dtype), logical_axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = token_matmul(x, effective_kernel(self, "gate_proj").astype(dtype), "d,df->f")
        up = token_matmul(x, effective_kernel(self, "up_proj").astype(dtype), "d,df->f")
        return token_matmul(gelu_tanh(gate) * up, effective_kernel(self, "down_proj").astype(dtype), "f,fd->d")
