"""From a clean SFT batch to the canvas the decoder denoises.

The reference scores ONE response block per example but runs the whole response as the canvas; since unscored
blocks get no gradient and (with the block-causal visibility) do not influence the scored block, we run only the
selected block, at its absolute positions and with its encoder visibility. `full_response_canvas` builds the
reference layout; it is the oracle that `selected_block_canvas` is tested against.

Both canvases are gathered from the same corrupted sequence (`corruption.corrupt` over the whole [B, S] row), so
a position carries the same noise in either layout.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_gemma.model import masks
from diffusion_gemma.objective import randomness
from diffusion_gemma.objective.corruption import Corruption


@flax.struct.dataclass
class SftBatch:
    """One batch of single-turn SFT examples, right-padded to a common length S.

    input_ids [B, S] int32 clean tokens; attention_mask [B, S] bool (prompt + response + EOS fill);
    supervised_mask [B, S] bool (response + EOS fill); response_start [B] int32 (prefix length: the response's
    first position); example_index [B] int32 (global index in the data stream; keys all randomness);
    clamped_mask [B, S] bool (response tokens given to the model: never corrupted, never scored), None = none.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    supervised_mask: jax.Array
    response_start: jax.Array
    example_index: jax.Array
    clamped_mask: jax.Array | None = None

    @property
    def clamped(self) -> jax.Array:
        """[B, S] bool, all False without a clamp."""
        if self.clamped_mask is None:
            return jnp.zeros(self.supervised_mask.shape, bool)
        return self.clamped_mask.astype(bool)

    @property
    def denoised_mask(self) -> jax.Array:
        """[B, S] bool: supervised and not clamped, the positions the diffusion objective corrupts and scores."""
        return self.supervised_mask.astype(bool) & ~self.clamped


@flax.struct.dataclass
class Canvas:
    """The decoder's input and targets, [B, C] each.

    clean_ids are the targets, noised_ids the input; noise_mask marks resampled positions; valid_mask real
    (attended) positions; scored_mask the supervised, unclamped positions of the selected block (the diffusion
    loss's tokens); positions are absolute (response_start + offset); blocks the response block of each position;
    visibility the training decoder visibility over [encoder cache ; canvas].
    """

    clean_ids: jax.Array
    noised_ids: jax.Array
    noise_mask: jax.Array
    valid_mask: jax.Array
    scored_mask: jax.Array
    positions: jax.Array
    blocks: jax.Array
    visibility: dict[str, jax.Array]


def num_response_blocks(sequence_length: int, block_size: int) -> int:
    """Static upper bound on the response blocks of a row of length S (a response may start at position 0)."""
    return -(-sequence_length // block_size)


def supervised_tokens_per_block(supervised_mask: jax.Array, response_start: jax.Array,
                                block_size: int) -> jax.Array:
    """[B, S] bool, [B] -> [B, num_response_blocks] int32 counts of supervised tokens in each response block."""
    length = supervised_mask.shape[1]
    position_blocks = masks.response_blocks(length, response_start, block_size)               # [B, S]
    one_hot = jax.nn.one_hot(position_blocks, num_response_blocks(length, block_size), dtype=jnp.int32)
    return jnp.einsum("bs,bsn->bn", supervised_mask.astype(jnp.int32), one_hot)               # [B, N]


def choose_blocks(supervised_mask: jax.Array, response_start: jax.Array, keys: jax.Array,
                  block_size: int) -> jax.Array:
    """One block per example, uniform among its valid blocks (those with >= 1 supervised token) -> [B] int32.

    The objective passes `SftBatch.denoised_mask`, so a block whose tokens are all clamped is never chosen.
    An example without such tokens gets block 0; it contributes no scored token.
    """
    valid = supervised_tokens_per_block(supervised_mask, response_start, block_size) > 0
    choice_keys = randomness.stream_keys(keys, randomness.BLOCK_CHOICE)
    logits = jnp.where(valid, 0.0, -jnp.inf)
    chosen = jax.vmap(jax.random.categorical)(choice_keys, logits)
    return jnp.where(valid.any(axis=-1), chosen, 0).astype(jnp.int32)


def _gather_canvas(batch: SftBatch, corruption: Corruption, offsets: jax.Array, chosen_blocks: jax.Array, *,
                   block_size: int, sliding_window: int, pad_token_id: int) -> Canvas:
    """offsets [B, C]: response offsets of the canvas positions. Positions past the row end become pad."""
    length = batch.input_ids.shape[1]
    positions = batch.response_start.astype(jnp.int32)[:, None] + offsets                       # [B, C]
    in_row = positions < length
    index = jnp.minimum(positions, length - 1)

    def gather(values):
        return jnp.take_along_axis(values, index, axis=1)

    blocks = offsets // block_size
    valid = in_row & gather(batch.attention_mask.astype(bool))
    denoised = in_row & gather(batch.denoised_mask)
    visibility = masks.training_decoder_visibility(batch.attention_mask, batch.response_start, blocks, valid,
                                                   block_size=block_size, sliding_window=sliding_window)
    return Canvas(clean_ids=jnp.where(in_row, gather(batch.input_ids), pad_token_id),
                  noised_ids=jnp.where(in_row, gather(corruption.noised_ids), pad_token_id),
                  noise_mask=in_row & gather(corruption.noise_mask), valid_mask=valid,
                  scored_mask=denoised & (blocks == chosen_blocks[:, None]), positions=positions, blocks=blocks,
                  visibility=visibility)


def selected_block_canvas(batch: SftBatch, corruption: Corruption, chosen_blocks: jax.Array, *, block_size: int,
                          sliding_window: int, pad_token_id: int) -> Canvas:
    """The canvas actually trained on: only the chosen block of each example, C = block_size."""
    offsets = chosen_blocks.astype(jnp.int32)[:, None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    return _gather_canvas(batch, corruption, offsets, chosen_blocks, block_size=block_size,
                          sliding_window=sliding_window, pad_token_id=pad_token_id)


def full_response_canvas(batch: SftBatch, corruption: Corruption, chosen_blocks: jax.Array, *, block_size: int,
                         sliding_window: int, pad_token_id: int) -> Canvas:
    """The reference layout (oracle): every response block, C = num_response_blocks * block_size, with only the
    chosen block scored."""
    canvas_length = num_response_blocks(batch.input_ids.shape[1], block_size) * block_size
    offsets = jnp.broadcast_to(jnp.arange(canvas_length, dtype=jnp.int32), (batch.input_ids.shape[0], canvas_length))
    return _gather_canvas(batch, corruption, offsets, chosen_blocks, block_size=block_size,
                          sliding_window=sliding_window, pad_token_id=pad_token_id)
