"""The CPU segment-scan grouped matmul must equal `jax.lax.ragged_dot` (values and gradients), including empty
groups, groups that span several tiles and rows past the last group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_gemma.model.grouped_matmul import grouped_matmul, segment_ragged_dot


def _reference(lhs, rhs, group_sizes):
    """Row i through its group's weights with numpy loops; rows past the last group give zeros."""
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float64)
    start = 0
    for group, size in enumerate(np.asarray(group_sizes)):
        out[start:start + size] = np.asarray(lhs[start:start + size], np.float64) @ np.asarray(rhs[group], np.float64)
        start += size
    return out


@pytest.mark.parametrize("group_sizes", [
    [5, 0, 17, 3, 0, 9],          # empty groups in the middle
    [0, 0, 0, 34, 0, 0],          # one group holds every row
    [1, 2, 3, 4, 5, 6],           # rows 21..33 belong to no group
    [40, 0, 0, 0, 0, 0],          # the rows run past the end (sizes sum to more than N is not allowed: clipped)
])
def test_segment_scan_matches_ragged_dot_values_and_gradients(group_sizes):
    num_rows = 34
    group_sizes = np.minimum(np.asarray(group_sizes), num_rows - np.concatenate([[0], np.cumsum(group_sizes)[:-1]]))
    group_sizes = jnp.asarray(np.maximum(group_sizes, 0), jnp.int32)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(k1, (num_rows, 12), jnp.float32)
    rhs = jax.random.normal(k2, (6, 12, 7), jnp.float32)
    cotangent = jax.random.normal(k3, (num_rows, 7), jnp.float32)

    out = segment_ragged_dot(lhs, rhs, group_sizes)
    np.testing.assert_allclose(out, _reference(lhs, rhs, group_sizes), rtol=1e-5, atol=1e-5)

    def loss(fn, a, b):
        return jnp.sum(fn(a, b, group_sizes) * cotangent)

    covered = int(jnp.sum(group_sizes))
    grads = jax.grad(lambda a, b: loss(segment_ragged_dot, a, b), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(lambda a, b: loss(jax.lax.ragged_dot, a, b), argnums=(0, 1))(lhs, rhs)
    # ragged_dot leaves rows past the last group unspecified; compare the covered rows only.
    np.testing.assert_allclose(grads[0][:covered], want[0][:covered], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0][covered:], 0.0)
    np.testing.assert_allclose(grads[1], want[1], rtol=1e-5, atol=1e-5)


def test_dispatch_uses_the_segment_scan_on_cpu_and_agrees_under_jit():
    lhs = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4) / 10
    rhs = jnp.stack([jnp.eye(4, 3), 2 * jnp.eye(4, 3)])
    group_sizes = jnp.array([3, 5], jnp.int32)
    out = jax.jit(grouped_matmul)(lhs, rhs, group_sizes)
    np.testing.assert_allclose(out[:3], lhs[:3, :3], rtol=1e-6)
    np.testing.assert_allclose(out[3:], 2 * lhs[3:, :3], rtol=1e-6)
    assert "while" in jax.jit(grouped_matmul).lower(lhs, rhs, group_sizes).as_text()  # the scan, not a dense dot
