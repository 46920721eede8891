"""Per-example random streams.

Every random draw of the objective is a function of (base key, global example index, purpose) only, so the
noise an example sees does not depend on how the global batch is split into micro-batches or over devices, and
it is reproduced exactly on resume. Each purpose gets its own stream so that, e.g., the block choice does not
shift when the corruption settings change.
"""

from __future__ import annotations

import jax

# Stream ids folded into an example's key; one per independent decision.
CORRUPTION_RATE = 0
CORRUPTION_POSITIONS = 1
CORRUPTION_TOKENS = 2
BLOCK_CHOICE = 3
SELF_CONDITIONING_COIN = 4


def example_keys(base_key: jax.Array, example_indices: jax.Array) -> jax.Array:
    """base_key, example_indices [B] (global position of each example in the data stream) -> keys [B]."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, example_indices)


def stream_keys(keys: jax.Array, stream: int) -> jax.Array:
    """keys [B] -> the keys [B] of one purpose stream."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, stream)
