"""Boolean attention visibilities (True = the query may read the key) for the encoder and decoder passes.

The only place the visibility rules live: `DiffusionGemma.encode` and `DiffusionGemma.decode` call
`encoder_visibility` and `inference_decoder_visibility`, and the training objective builds its canvas with
`training_decoder_visibility`. Keys are indexed by cache slot (slot k holds the k-th encoded token), so the
rules stay right whatever positions (RoPE) the caller passes.

Decoder visibilities use the layout `DiffusionGemma.decode` takes: one array per layer type, [B, C, T + C], over
keys [cache slots 0..T-1 ; canvas 0..C-1]. The model turns False into the dtype's most negative finite value.

The training visibility (docs/TRAINING.md §4) is the main invariant of the objective: a canvas query of response
block qb may read the CLEAN encoder copies of strictly earlier blocks only (`qb > eb(k)`); `>=` would show it
the answer. On sliding layers the encoder window is anchored at the block start, so a training block sees
exactly what block-by-block inference holds in its cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_gemma.config import FULL, SLIDING

Visibility = dict[str, jax.Array]


def encoder_visibility(key_mask: jax.Array, sliding_window: int, *, query_start: jax.Array | int = 0,
                       num_queries: int | None = None) -> Visibility:
    """Causal visibility of an encoder chunk over the cache it is written into.

    key_mask [B, T] (True = the slot holds a real token, this chunk's included); the chunk's queries sit at slots
    query_start .. query_start + num_queries - 1 (default: the whole buffer, one-shot encoding). Returns
    [B, num_queries, T] per layer type: a query sees real keys at or before its slot; sliding layers keep only
    the W keys ending at the query (`query - W < key <= query`). Because the rule reads slots, not chunks,
    encoding in chunks sees exactly what one-shot encoding sees.
    """
    max_length = key_mask.shape[1]
    num_queries = max_length if num_queries is None else num_queries
    query_index = query_start + jnp.arange(num_queries)
    key_index = jnp.arange(max_length)
    causal = key_index[None, :] <= query_index[:, None]                                        # [Q, T]
    in_window = key_index[None, :] > query_index[:, None] - sliding_window
    real_keys = key_mask.astype(bool)[:, None, :]                                               # [B, 1, T]
    return {FULL: real_keys & causal[None], SLIDING: real_keys & (causal & in_window)[None]}


def response_blocks(num_positions: int, response_start: jax.Array, block_size: int) -> jax.Array:
    """Block index eb(k) = (k - response_start) // block_size of positions 0..num_positions-1, -1 in the prompt.

    response_start [B] -> [B, num_positions] int32.
    """
    offset = jnp.arange(num_positions, dtype=jnp.int32)[None, :] - response_start.astype(jnp.int32)[:, None]
    return jnp.where(offset >= 0, offset // block_size, -1)


def training_decoder_visibility(key_mask: jax.Array, response_start: jax.Array, canvas_blocks: jax.Array,
                                canvas_valid: jax.Array, *, block_size: int, sliding_window: int) -> Visibility:
    """Block-causal visibility of a training canvas against the clean encoder cache.

    key_mask [B, T]: cache slots holding real tokens (the encoder's attention mask, slot k = position k).
    response_start [B]: the prefix length. canvas_blocks [B, C]: response block of each canvas position (all
    equal for a single selected block). canvas_valid [B, C]: canvas positions holding real (attended) tokens.

    Encoder key k: visible iff real and `qb > eb(k)` (the prompt has eb = -1, so it is always visible on full
    layers); on sliding layers also `k >= response_start + qb * block_size - W + 1`.
    Canvas key: visible iff real and in the query's block; every canvas row keeps its own diagonal so that a
    pad row is never fully masked.
    """
    cache_length = key_mask.shape[1]
    canvas_length = canvas_blocks.shape[1]
    key_blocks = response_blocks(cache_length, response_start, block_size)                      # [B, T]
    earlier_block = key_blocks[:, None, :] < canvas_blocks[:, :, None]                          # [B, C, T]
    full_cached = key_mask.astype(bool)[:, None, :] & earlier_block
    window_start = response_start[:, None] + canvas_blocks * block_size - sliding_window + 1     # [B, C]
    in_window = jnp.arange(cache_length)[None, None, :] >= window_start[:, :, None]
    same_block = canvas_blocks[:, :, None] == canvas_blocks[:, None, :]                         # [B, C, C]
    diagonal = jnp.eye(canvas_length, dtype=bool)[None]
    canvas = (same_block & canvas_valid.astype(bool)[:, None, :]) | diagonal
    return {FULL: jnp.concatenate([full_cached, canvas], axis=-1),
            SLIDING: jnp.concatenate([full_cached & in_window, canvas], axis=-1)}


def inference_decoder_visibility(key_mask: jax.Array, cache_length: jax.Array | int, canvas_length: int,
                                 sliding_window: int, canvas_visibility: jax.Array | None = None) -> Visibility:
    """What block-by-block inference sees: every filled cache slot on full layers, the last W-1 filled slots on
    sliding layers (no per-query window), and the canvas.

    key_mask [B, T]; cache_length: slots filled so far. canvas_visibility [B, C, C] restricts the canvas part
    (default: the whole canvas, bidirectional).
    """
    batch, max_length = key_mask.shape
    key_index = jnp.arange(max_length)
    filled = key_mask.astype(bool) & (key_index < cache_length)[None]
    recent = (key_index >= cache_length - (sliding_window - 1))[None]
    if canvas_visibility is None:
        canvas_visibility = jnp.ones((batch, canvas_length, canvas_length), bool)
    out = {}
    for layer_type, keys in ((FULL, filled), (SLIDING, filled & recent)):
        cached = jnp.broadcast_to(keys[:, None, :], (batch, canvas_length, max_length))
        out[layer_type] = jnp.concatenate([cached, canvas_visibility.astype(bool)], axis=-1)
    return out
