"""The attention visibilities of `diffusion_gemma.model.masks`, the only module that builds them, checked against
brute-force loops over the rules of docs/TRAINING.md §4 and docs/ARCHITECTURE.md §8, and through the model that
calls them (`DiffusionGemma.encode` / `decode`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_gemma.config import FULL, SLIDING, ModelConfig
from diffusion_gemma.model import masks
from diffusion_gemma.model.transformer import DiffusionGemma

WINDOW = 6
BLOCK = 4


def _random_rows(seed, batch=5, length=23):
    """Prefix lengths, right padding and key masks of a few ragged rows."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 9, batch)
    real_lengths = np.array([rng.integers(start, length + 1) for start in starts])
    real_lengths[0] = length                                      # one row without padding
    key_mask = np.arange(length)[None, :] < real_lengths[:, None]
    return starts, key_mask


def _expected_encoder_visibility(key_mask, query_start, num_queries, layer_type):
    """Causal (+ W-key window on sliding layers) over cache slots, one (query, key) pair at a time."""
    batch, length = key_mask.shape
    expected = np.zeros((batch, num_queries, length), bool)
    for b in range(batch):
        for row in range(num_queries):
            query = query_start + row
            for key in range(length):
                in_window = layer_type == FULL or key > query - WINDOW
                expected[b, row, key] = key_mask[b, key] and key <= query and in_window
    return expected


def test_encoder_visibility_matches_the_causal_sliding_rule():
    _, key_mask = _random_rows(0)
    visibility = masks.encoder_visibility(jnp.asarray(key_mask), WINDOW)
    for layer_type in (FULL, SLIDING):
        expected = _expected_encoder_visibility(key_mask, 0, key_mask.shape[1], layer_type)
        np.testing.assert_array_equal(np.asarray(visibility[layer_type]), expected)


@pytest.mark.parametrize("query_start, num_queries", [(0, 5), (5, 7), (12, 11), (20, 3)])
def test_encoder_visibility_of_a_chunk_written_at_an_offset(query_start, num_queries):
    """A chunk's queries at slots start..start+n-1 over the whole fixed-size cache (as `encode` calls it, with a
    traced start): the brute-force rule, and the same rows as one-shot encoding of the filled prefix."""
    _, key_mask = _random_rows(5)
    written = key_mask & (np.arange(key_mask.shape[1]) < query_start + num_queries)[None]  # later slots: empty
    chunk = jax.jit(masks.encoder_visibility, static_argnames=("sliding_window", "num_queries"))(
        jnp.asarray(written), WINDOW, query_start=jnp.asarray(query_start, jnp.int32), num_queries=num_queries)
    one_shot = masks.encoder_visibility(jnp.asarray(key_mask), WINDOW)
    rows = slice(query_start, query_start + num_queries)
    for layer_type in (FULL, SLIDING):
        expected = _expected_encoder_visibility(written, query_start, num_queries, layer_type)
        np.testing.assert_array_equal(np.asarray(chunk[layer_type]), expected)
        np.testing.assert_array_equal(np.asarray(chunk[layer_type]), np.asarray(one_shot[layer_type])[:, rows])


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


def _expected_inference_visibility(key_mask, filled, canvas_visibility, layer_type):
    """docs/ARCHITECTURE.md §8: real filled slots (the last W-1 of them on sliding layers), then the canvas."""
    batch, length = key_mask.shape
    canvas_length = canvas_visibility.shape[1]
    out = np.zeros((batch, canvas_length, length + canvas_length), bool)
    for b in range(batch):
        for key in range(length):
            recent = layer_type == FULL or key >= filled - (WINDOW - 1)
            out[b, :, key] = key_mask[b, key] and key < filled and recent
        out[b, :, length:] = canvas_visibility[b]
    return out


@pytest.mark.parametrize("filled", [0, 3, 5, 12, 20])
def test_inference_visibility_matches_the_rule(filled):
    _, key_mask = _random_rows(4, length=20)
    batch, canvas_length = key_mask.shape[0], 7
    causal_canvas = np.broadcast_to(np.tri(canvas_length, dtype=bool), (batch, canvas_length, canvas_length))
    for canvas_visibility in (None, causal_canvas):
        visibility = masks.inference_decoder_visibility(
            jnp.asarray(key_mask), jnp.asarray(filled, jnp.int32), canvas_length, WINDOW,
            None if canvas_visibility is None else jnp.asarray(canvas_visibility))
        canvas = np.ones((batch, canvas_length, canvas_length), bool) if canvas_visibility is None \
            else canvas_visibility
        for layer_type in (FULL, SLIDING):
            expected = _expected_inference_visibility(key_mask, filled, canvas, layer_type)
            np.testing.assert_array_equal(np.asarray(visibility[layer_type]), expected)


def test_training_visibility_of_a_block_equals_the_inference_cache_after_its_earlier_blocks():
    """Training block qb must see what block-by-block inference holds: prompt + clean blocks < qb."""
    starts, key_mask = _random_rows(3)
    batch, length = key_mask.shape
    inference = jax.jit(jax.vmap(
        lambda row_mask, filled: jax.tree.map(
            lambda mask: mask[0], masks.inference_decoder_visibility(row_mask[None], filled, BLOCK, WINDOW))))
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


# ------------------------------------------------------------------------------ through the model that calls them
MODEL_WINDOW = 3
RTOL = ATOL = 1e-5  # ours against ours: the same float32 ops over differently shaped (masked) key sets


@pytest.fixture(scope="module")
def model():
    """Two layers [sliding, full] with a window shorter than the chunks, so every rule is exercised."""
    config = ModelConfig.tiny(num_layers=2, vocab_size=64, sliding_window=MODEL_WINDOW)
    assert config.layer_types == (SLIDING, FULL)
    return DiffusionGemma(config, rngs=nnx.Rngs(0))


def _ids(seed, batch, length, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, (batch, length)), jnp.int32)


def test_chunked_encoding_equals_one_shot_encoding(model):
    """Three chunks of different sizes (one with pad tokens) written at offsets into one cache give the hidden
    states, cache and decode logits of encoding the whole sequence at once."""
    chunks = (5, 2, 6)
    total = sum(chunks)
    ids = _ids(0, 2, total)
    padding = np.ones((2, total), bool)
    padding[1, 1:3] = False                                       # pad tokens inside the first chunk
    padding = jnp.asarray(padding)
    at_once, hidden = model.encode(ids, padding_mask=padding)
    cache, pieces, start = model.init_cache(2, total), [], 0
    for size in chunks:
        cache, piece = model.encode(ids[:, start:start + size], padding_mask=padding[:, start:start + size],
                                    cache=cache)
        pieces.append(piece)
        start += size
    close = functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL)
    real = np.asarray(padding)
    close(np.concatenate(pieces, axis=1)[real], np.asarray(hidden)[real])
    assert int(cache.length) == int(at_once.length) == total
    np.testing.assert_array_equal(np.asarray(cache.key_mask), np.asarray(padding))
    for chunked, whole in zip(cache.keys + cache.values, at_once.keys + at_once.values):
        close(chunked, whole)
    canvas = _ids(1, 2, BLOCK)
    close(model.decode(canvas, cache), model.decode(canvas, at_once))


def test_encoding_is_causal(model):
    """A token changes the hidden states at and after its slot only (the encoder visibility is what runs)."""
    ids = _ids(2, 1, 10)
    _, hidden = model.encode(ids)
    _, changed = model.encode(ids.at[0, 6].set((ids[0, 6] + 1) % 64))
    np.testing.assert_allclose(np.asarray(changed)[:, :6], np.asarray(hidden)[:, :6], rtol=RTOL, atol=ATOL)
    assert not np.allclose(np.asarray(changed)[:, 6], np.asarray(hidden)[:, 6])


def test_decode_default_visibility_is_the_masks_module(model):
    """`decode` without `visibility` equals `decode` with `masks.inference_decoder_visibility` passed in; a causal
    `canvas_visibility` reaches the model (a later canvas token no longer moves an earlier one's logits)."""
    padding = np.ones((2, 9), bool)
    padding[0, 2] = False
    cache, _ = model.encode(_ids(3, 2, 9), padding_mask=jnp.asarray(padding))
    canvas = _ids(4, 2, BLOCK)
    explicit = masks.inference_decoder_visibility(cache.key_mask, cache.length, BLOCK, MODEL_WINDOW)
    np.testing.assert_array_equal(np.asarray(model.decode(canvas, cache)),
                                  np.asarray(model.decode(canvas, cache, visibility=explicit)))

    causal = masks.inference_decoder_visibility(cache.key_mask, cache.length, BLOCK, MODEL_WINDOW,
                                                jnp.broadcast_to(jnp.tri(BLOCK, dtype=bool), (2, BLOCK, BLOCK)))
    changed = canvas.at[:, -1].set((canvas[:, -1] + 1) % 64)
    causal_logits = np.asarray(model.decode(canvas, cache, visibility=causal))
    causal_changed = np.asarray(model.decode(changed, cache, visibility=causal))
    np.testing.assert_allclose(causal_changed[:, :-1], causal_logits[:, :-1], rtol=RTOL, atol=ATOL)
    bidirectional = np.asarray(model.decode(canvas, cache))
    assert not np.allclose(np.asarray(model.decode(changed, cache))[:, 0], bidirectional[:, 0])
