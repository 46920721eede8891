"""Grouped matmul (`ragged_dot`) with a CPU implementation that does the grouped work only.

`grouped_matmul(lhs, rhs, group_sizes)` is `jax.lax.ragged_dot` on GPU/TPU. On CPU, JAX lowers `ragged_dot` to
one dense matmul over a [G, N, K] masked copy of the rows (every row through every group's weights: G times the
work, plus the copy); there it runs `segment_ragged_dot` instead: the sorted rows are cut into tiles, each tile
into the pieces that belong to one group, and a `lax.scan` over those (tile, group) segments does one small
matmul per segment against that group's weights. Work: (N + G * tile) rows instead of G * N, with a custom VJP
whose backward is two such scans (rows' gradient against the transposed weights; the weights' gradient
accumulated per group). Same results up to float rounding order; rows past the last group (the "no expert" rows
of the MoE) give zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MAX_TILE = 256


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs [N, K] sorted by group, rhs [G, K, M], group_sizes [G] int32 -> [N, M] (row i uses its group's rhs)."""
    return jax.lax.platform_dependent(lhs, rhs, group_sizes, cpu=segment_ragged_dot, default=jax.lax.ragged_dot)


def _tile_rows(num_rows: int, num_groups: int) -> int:
    """Rows per tile: a power of two in [8, 256], about N / (2 G), so the per-segment padding (at most one tile per
    group boundary, G * tile rows) stays under about half of the real rows."""
    target = min(max(num_rows // (2 * num_groups), 1), _MAX_TILE)
    tile = 8
    while tile * 2 <= target:
        tile *= 2
    return tile


def _segments(group_sizes: jax.Array, num_rows: int, tile: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (start, end, group) row segments, each inside one tile and one group; static count tiles + G. Segments
    past every group get group G; empty ones have start == end."""
    num_tiles = -(-num_rows // tile)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes
    group_starts = jnp.where((group_sizes > 0) & (starts < num_rows), starts, num_rows)
    points = jnp.sort(jnp.concatenate([jnp.arange(num_tiles, dtype=jnp.int32) * tile, group_starts]))
    groups = jnp.searchsorted(ends, points, side="right").astype(jnp.int32)
    # A segment ends at the next break point or at its group's end (rows after the last group belong to none).
    group_ends = jnp.where(groups < group_sizes.shape[0], ends[jnp.minimum(groups, group_sizes.shape[0] - 1)],
                           num_rows)
    segment_ends = jnp.minimum(jnp.concatenate([points[1:], jnp.full((1,), num_rows, jnp.int32)]), group_ends)
    return points, segment_ends, groups


def _zeros(shape, *like: jax.Array) -> jax.Array:
    """fp32 zeros that vary over the same manual mesh axes as `like` (inside shard_map a scan carry must match the
    varying-ness of the body's output, which reads all of them)."""
    out = jnp.zeros(shape, jnp.float32)
    for array in like:
        out = out + jnp.zeros_like(array, dtype=jnp.float32, shape=shape)
    return out


def _pad_rows(x: jax.Array, tile: int) -> jax.Array:
    return jnp.pad(x, ((0, -(-x.shape[0] // tile) * tile - x.shape[0]), (0, 0)))


def _segment_mask(start, end, group, num_groups, tile):
    first = (start // tile) * tile
    rows = first + jnp.arange(tile)
    return first, (rows >= start) & (rows < end) & (group < num_groups)


def _gmm(lhs, rhs, segments, tile: int, transpose_rhs: bool) -> jax.Array:
    """Per segment: out[rows] = lhs[rows] @ rhs[group] (or rhs[group].T); fp32 accumulation."""
    num_rows, num_groups = lhs.shape[0], rhs.shape[0]
    x = _pad_rows(lhs, tile)
    out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]

    def body(out, segment):
        start, end, group = segment
        first, mask = _segment_mask(start, end, group, num_groups, tile)
        weights = jax.lax.dynamic_index_in_dim(rhs, jnp.minimum(group, num_groups - 1), keepdims=False)
        product = jnp.dot(jax.lax.dynamic_slice_in_dim(x, first, tile), weights.T if transpose_rhs else weights,
                          preferred_element_type=jnp.float32)
        current = jax.lax.dynamic_slice_in_dim(out, first, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask[:, None], product, current), first, 0), None

    out, _ = jax.lax.scan(body, _zeros((x.shape[0], out_dim), lhs, rhs, *segments), segments)
    return out[:num_rows].astype(lhs.dtype)


def _gmm_weight_grad(lhs, grad_out, segments, tile: int, num_groups: int) -> jax.Array:
    """Per group g: sum over its rows of lhs[row]^T grad_out[row] -> [G, K, M] fp32."""
    x, dy = _pad_rows(lhs, tile), _pad_rows(grad_out, tile)

    def body(grad, segment):
        start, end, group = segment
        first, mask = _segment_mask(start, end, group, num_groups, tile)
        rows = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(x, first, tile), jnp.zeros((), x.dtype))
        index = jnp.minimum(group, num_groups - 1)
        current = jax.lax.dynamic_index_in_dim(grad, index, keepdims=False)
        update = current + jnp.dot(rows.T, jax.lax.dynamic_slice_in_dim(dy, first, tile),
                                   preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(grad, update, index, 0), None

    grad, _ = jax.lax.scan(body, _zeros((num_groups, lhs.shape[1], grad_out.shape[1]), lhs, grad_out, *segments),
                           segments)
    return grad


@jax.custom_vjp
def segment_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`ragged_dot(lhs, rhs, group_sizes)` as a scan over (tile, group) segments (the CPU path)."""
    tile = _tile_rows(lhs.shape[0], rhs.shape[0])
    return _gmm(lhs, rhs, _segments(group_sizes, lhs.shape[0], tile), tile, transpose_rhs=False)


def _segment_ragged_dot_fwd(lhs, rhs, group_sizes):
    return segment_ragged_dot(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _varying_axes(x: jax.Array) -> frozenset:
    """The manual mesh axes `x` varies over inside shard_map (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _like_primal(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside shard_map, sum a cotangent over the axes along which its primal is replicated (what JAX's own
    transpose of an implicit broadcast does), so the custom VJP returns the primal's type."""
    extra = _varying_axes(grad) - _varying_axes(primal)
    grad = jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad
    return grad.astype(primal.dtype)


def _segment_ragged_dot_bwd(residuals, grad_out):
    lhs, rhs, group_sizes = residuals
    tile = _tile_rows(lhs.shape[0], rhs.shape[0])
    segments = _segments(group_sizes, lhs.shape[0], tile)
    grad_lhs = _gmm(grad_out, rhs, segments, tile, transpose_rhs=True)
    grad_rhs = _gmm_weight_grad(lhs, grad_out, segments, tile, rhs.shape[0])
    return _like_primal(grad_lhs, lhs), _like_primal(grad_rhs, rhs), None


segment_ragged_dot.defvjp(_segment_ragged_dot_fwd, _segment_ragged_dot_bwd)
