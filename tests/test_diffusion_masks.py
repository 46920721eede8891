"""Attention visibilities checked against brute-force loops over the rules of docs/TRAINING.md §4 and
docs/ARCHITECTURE.md §8, and against what the model itself uses at inference."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_gemma.config import FULL, SLIDING, ModelConfig
from diffusion_gemma.model import masks
from diffusion_gemma.model.transformer import DiffusionGemma, KVCache

WINDOW = 6
BLOCK = 4


def _abstract_model():
    """Only the config is read by `decoder_visibility`: no need to materialise weights."""
    config = ModelConfig.tiny(num_layers=2, vocab_size=32, sliding_window=WINDOW)
    return nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))


def _random_rows(seed, batch=5, length=23):
    """Prefix lengths, right padding and key masks of a few ragged rows."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 9, batch)
    real_lengths = np.array([rng.integers(start, length + 1) for start in starts])
    real_lengths[0] = length                                      # one row without padding
    key_mask = np.arange(length)[None, :] < real_lengths[:, None]
    return starts, key_mask


def test_encoder_visibility_matches_the_causal_sliding_rule():
    _, key_mask = _random_rows(0)
    visibility = masks.encoder_visibility(jnp.asarray(key_mask), WINDOW)
    batch, length = key_mask.shape
    for layer_type in (FULL, SLIDING):
        expected = np.zeros((batch, length, length), bool)
        for b in range(batch):
            for query in range(length):
                for key in range(length):
                    in_window = layer_type == FULL or key > query - WINDOW
                    expected[b, query, key] = key_mask[b, key] and key <= query and in_window
        np.testing.assert_array_equal(np.asarray(visibility[layer_type]), expected)


def _expected_training_visibility(key_mask, starts, canvas_blocks, canvas_valid, layer_type):
    """docs/TRAINING.md §4, one (query, key) pair at a time."""
    batch, cache_length = key_mask.shape
    canvas_length = canvas_blocks.shape[1]
    out = np.zeros((batch, canvas_length, cache_length + canvas_length), bool)
    for b in range(batch):
        for query in range(canvas_length):
            query_block = canvas_blocks[b, query]
            for key in range(cache_length):
                key_block = (key - starts[b]) // BLOCK if key >= starts[b] else -1
                visible = key_mask[b, key] and query_block > key_block
                if layer_type == SLIDING:
                    visible = visible and key >= starts[b] + query_block * BLOCK - WINDOW + 1
                out[b, query, key] = visible
            for key in range(canvas_length):
                same_block = canvas_blocks[b, key] == query_block
                out[b, query, cache_length + key] = (same_block and canvas_valid[b, key]) or key == query
    return out


def test_training_visibility_matches_the_block_causal_rule_on_a_full_canvas():
    starts, key_mask = _random_rows(1)
    batch, length = key_mask.shape
    canvas_length = 6 * BLOCK
    canvas_blocks = np.broadcast_to(np.arange(canvas_length) // BLOCK, (batch, canvas_length))
    positions = starts[:, None] + np.arange(canvas_length)[None]
    canvas_valid = (positions < length) & key_mask[np.arange(batch)[:, None], np.minimum(positions, length - 1)]
    visibility = masks.training_decoder_visibility(
        jnp.asarray(key_mask), jnp.asarray(starts), jnp.asarray(canvas_blocks), jnp.asarray(canvas_valid),
        block_size=BLOCK, sliding_window=WINDOW)
    for layer_type in (FULL, SLIDING):
        expected = _expected_training_visibility(key_mask, starts, canvas_blocks, canvas_valid, layer_type)
        np.testing.assert_array_equal(np.asarray(visibility[layer_type]), expected)


def test_no_query_sees_its_own_or_a_later_clean_block_and_no_row_is_empty():
    starts, key_mask = _random_rows(2)
    batch, length = key_mask.shape
    canvas_length = 6 * BLOCK
    canvas_blocks = np.broadcast_to(np.arange(canvas_length) // BLOCK, (batch, canvas_length))
    canvas_valid = np.zeros((batch, canvas_length), bool)           # worst case: every canvas row is pad
    visibility = masks.training_decoder_visibility(
        jnp.asarray(key_mask), jnp.asarray(starts), jnp.asarray(canvas_blocks), jnp.asarray(canvas_valid),
        block_size=BLOCK, sliding_window=WINDOW)
    key_blocks = np.asarray(masks.response_blocks(length, jnp.asarray(starts), BLOCK))
    for layer_type in (FULL, SLIDING):
        cached = np.asarray(visibility[layer_type])[:, :, :length]
        leaks = cached & (key_blocks[:, None, :] >= canvas_blocks[:, :, None])
        assert not leaks.any()
        assert np.asarray(visibility[layer_type]).any(axis=-1).all()


def test_training_visibility_of_a_block_equals_the_inference_cache_after_its_earlier_blocks():
    """Training block qb must see what block-by-block inference holds: prompt + clean blocks < qb."""
    starts, key_mask = _random_rows(3)
    batch, length = key_mask.shape
    model = _abstract_model()

    @jax.jit
    @jax.vmap
    def inference(row_mask, filled):
        cache = KVCache(keys=(), values=(), key_mask=row_mask[None], length=filled)
        return jax.tree.map(lambda mask: mask[0], model.decoder_visibility(cache, BLOCK))

    training_visibility = jax.jit(masks.training_decoder_visibility, static_argnames=("block_size", "sliding_window"))
    for query_block in range(4):
        filled = starts + query_block * BLOCK
        training = training_visibility(
            jnp.asarray(key_mask), jnp.asarray(starts), jnp.full((batch, BLOCK), query_block),
            jnp.ones((batch, BLOCK), bool), block_size=BLOCK, sliding_window=WINDOW)
        expected = inference(jnp.asarray(key_mask), jnp.asarray(filled, jnp.int32))
        rows = filled <= length
        for layer_type in (FULL, SLIDING):
            np.testing.assert_array_equal(np.asarray(training[layer_type])[rows],
                                          np.asarray(expected[layer_type])[rows])


def test_inference_visibility_equals_the_model():
    model = _abstract_model()
    _, key_mask = _random_rows(4, length=20)
    for filled in (0, 3, 5, 12, 20):
        cache = KVCache(keys=(), values=(), key_mask=jnp.asarray(key_mask), length=jnp.asarray(filled, jnp.int32))
        ours = masks.inference_decoder_visibility(cache.key_mask, cache.length, 7, WINDOW)
        theirs = model.decoder_visibility(cache, 7)
        for layer_type in (FULL, SLIDING):
            np.testing.assert_array_equal(np.asarray(ours[layer_type]), np.asarray(theirs[layer_type]))
