"""Block choice and canvas construction: which block, which tokens, which positions, which visibility."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_gemma.objective import batching, randomness
from diffusion_gemma.objective.batching import SftBatch
from diffusion_gemma.objective.corruption import CorruptionSettings, corrupt
from diffusion_gemma.objective.sft import ObjectiveSettings, loss_counts

VOCAB, EOS, PAD = 32, 1, 0
BLOCK, WINDOW = 4, 6


def random_sft_batch(seed, batch, length, prompt_range=(1, 8)):
    """Ragged single-turn examples: prompt, response, EOS fill up to a block multiple (cut at the row end), pad.
    Row 0 is a prompt without response (nothing supervised)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, length))
    attention = np.zeros((batch, length), bool)
    supervised = np.zeros((batch, length), bool)
    starts = rng.integers(*prompt_range, batch)
    for b in range(batch):
        response = 0 if b == 0 else rng.integers(1, length - starts[b] + 1)
        end = min(starts[b] + -(-response // BLOCK) * BLOCK, length)
        ids[b, starts[b] + response:end] = EOS
        attention[b, :end] = True
        supervised[b, starts[b]:end] = True
    ids = np.where(attention, ids, PAD)
    return SftBatch(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(attention),
                    supervised_mask=jnp.asarray(supervised), response_start=jnp.asarray(starts, jnp.int32),
                    example_index=jnp.arange(batch, dtype=jnp.int32))


def _keys(batch):
    return randomness.example_keys(jax.random.key(3), batch.example_index)


def test_blocks_are_chosen_uniformly_among_valid_blocks():
    examples, length = 4000, 24
    supervised = np.zeros((examples, length), bool)
    supervised[:, 4:6] = True            # block 0 (response starts at 2)
    supervised[:, 12] = True             # block 2; blocks 1, 3 and 4 are empty
    supervised[:, 17] = True             # block 3
    starts = jnp.full((examples,), 2, jnp.int32)
    keys = randomness.example_keys(jax.random.key(0), jnp.arange(examples))
    chosen = np.asarray(jax.jit(batching.choose_blocks, static_argnums=3)(jnp.asarray(supervised), starts, keys,
                                                                            BLOCK))
    counts = np.bincount(chosen, minlength=batching.num_response_blocks(length, BLOCK))
    assert counts[1] == counts[4] == counts[5] == 0
    expected = examples / 3
    assert np.all(np.abs(counts[[0, 2, 3]] - expected) < 5 * np.sqrt(expected * 2 / 3))


def test_block_choice_depends_only_on_the_example_key():
    batch = random_sft_batch(0, 8, 24)
    choose = jax.jit(lambda batch: batching.choose_blocks(batch.supervised_mask, batch.response_start, _keys(batch),
                                                          BLOCK))
    whole = choose(batch)
    half = choose(jax.tree.map(lambda field: field[4:], batch))
    np.testing.assert_array_equal(np.asarray(whole)[4:], np.asarray(half))


@jax.jit
def _canvases(batch):
    keys = _keys(batch)
    corruption = corrupt(batch.input_ids, batch.supervised_mask, keys, vocab_size=VOCAB,
                         settings=CorruptionSettings())
    chosen = batching.choose_blocks(batch.supervised_mask, batch.response_start, keys, BLOCK)
    kwargs = dict(block_size=BLOCK, sliding_window=WINDOW, pad_token_id=PAD)
    return (corruption, chosen, batching.selected_block_canvas(batch, corruption, chosen, **kwargs),
            batching.full_response_canvas(batch, corruption, chosen, **kwargs))


def test_selected_canvas_holds_the_chosen_block_at_its_absolute_positions():
    batch = random_sft_batch(1, 8, 22)
    corruption, chosen, canvas, _ = jax.device_get(_canvases(batch))
    ids, noised = np.asarray(batch.input_ids), corruption.noised_ids
    supervised, length = np.asarray(batch.supervised_mask), ids.shape[1]
    for b in range(8):
        for j in range(BLOCK):
            position = int(batch.response_start[b]) + int(chosen[b]) * BLOCK + j
            assert int(canvas.positions[b, j]) == position
            in_row = position < length
            assert int(canvas.clean_ids[b, j]) == (ids[b, position] if in_row else PAD)
            assert int(canvas.noised_ids[b, j]) == (noised[b, position] if in_row else PAD)
            assert bool(canvas.scored_mask[b, j]) == (in_row and supervised[b, position])
    # Every example with a supervised token scores at least one; the counts agree with the model-free ones.
    assert np.asarray(canvas.scored_mask).any(axis=1).tolist() == supervised.any(axis=1).tolist()
    counts = jax.jit(loss_counts, static_argnums=2)(batch, jax.random.key(3), ObjectiveSettings(block_size=BLOCK))
    assert int(counts.diffusion) == int(np.asarray(canvas.scored_mask).sum())


def test_selected_canvas_is_the_chosen_slice_of_the_full_canvas():
    batch = random_sft_batch(2, 8, 22)
    _, chosen, selected, full = jax.device_get(_canvases(batch))
    length = selected.clean_ids.shape[1]
    full_columns = chosen[:, None] * BLOCK + np.arange(BLOCK)
    for field in ("clean_ids", "noised_ids", "noise_mask", "valid_mask", "scored_mask", "positions", "blocks"):
        sliced = np.take_along_axis(np.asarray(getattr(full, field)), full_columns, axis=1)
        np.testing.assert_array_equal(sliced, np.asarray(getattr(selected, field)), err_msg=field)
    assert int(np.asarray(full.scored_mask).sum()) == int(np.asarray(selected.scored_mask).sum())
    cache_length = batch.input_ids.shape[1]
    for layer_type, visibility in selected.visibility.items():
        full_rows = np.take_along_axis(np.asarray(full.visibility[layer_type]), full_columns[:, :, None], axis=1)
        np.testing.assert_array_equal(full_rows[:, :, :cache_length], np.asarray(visibility)[:, :, :cache_length])
        canvas_keys = np.take_along_axis(full_rows[:, :, cache_length:], full_columns[:, None, :], axis=2)
        np.testing.assert_array_equal(canvas_keys, np.asarray(visibility)[:, :, cache_length:])
        # In the full canvas the chosen block's rows see no canvas key outside their block.
        assert full_rows[:, :, cache_length:].sum() == canvas_keys.sum()
    assert length == BLOCK
