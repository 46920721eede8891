"""Forward (noising) process of the SFT objective: one rate t per example, applied to supervised positions only.

Uniform-random replacement is what DiffusionGemma was trained with (docs/TRAINING.md §3): each supervised token is
replaced with probability t by a token drawn uniformly from the whole vocabulary, which may equal the clean
token. The absorbing variant (replace by a [MASK] id) is offered for experiments. Prompt, BOS and pad positions
are never touched, nor are clamped positions (response tokens given to the model as known, for infilling).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_gemma.objective import randomness

UNIFORM = "uniform"
ABSORBING = "absorbing"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorruptionSettings:
    """`eps` bounds t away from 0 so every example carries some noise; `mask_token_id` is used by `absorbing`."""

    kind: str = UNIFORM
    eps: float = 1e-3
    mask_token_id: int | None = None

    def __post_init__(self):
        if self.kind not in (UNIFORM, ABSORBING):
            raise ValueError(f"CorruptionSettings.kind = {self.kind!r}; expected {UNIFORM!r} or {ABSORBING!r}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"CorruptionSettings.eps must be in [0, 1), got {self.eps}")
        if self.kind == ABSORBING and self.mask_token_id is None:
            raise ValueError("CorruptionSettings.kind = 'absorbing' needs a mask_token_id")


@flax.struct.dataclass
class Corruption:
    """noised_ids [B, S]; noise_mask [B, S] (positions that were resampled, whether or not the draw changed the
    token); rate [B] (the t of each example)."""

    noised_ids: jax.Array
    noise_mask: jax.Array
    rate: jax.Array


def sample_rates(keys: jax.Array, eps: float) -> jax.Array:
    """keys [B] -> t [B] ~ U(eps, 1), one per example."""
    rate_keys = randomness.stream_keys(keys, randomness.CORRUPTION_RATE)
    return jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32, minval=eps, maxval=1.0))(rate_keys)


def corrupt(clean_ids: jax.Array, supervised_mask: jax.Array, keys: jax.Array, *, vocab_size: int,
            settings: CorruptionSettings, clamped_mask: jax.Array | None = None) -> Corruption:
    """clean_ids [B, S], supervised_mask [B, S] bool, keys [B] (per-example, see `randomness.example_keys`),
    clamped_mask [B, S] bool (kept clean; None = none).

    Draws are made per example over the whole padded row, so an example's noise depends only on its key and the
    row length, never on its batch neighbours, and clamping a position leaves the noise of the others as it was.
    """
    length = clean_ids.shape[1]
    rates = sample_rates(keys, settings.eps)
    position_keys = randomness.stream_keys(keys, randomness.CORRUPTION_POSITIONS)
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (length,), jnp.float32))(position_keys)
    noise_mask = (uniforms < rates[:, None]) & supervised_mask.astype(bool)
    if clamped_mask is not None:
        noise_mask = noise_mask & ~clamped_mask.astype(bool)
    if settings.kind == UNIFORM:
        token_keys = randomness.stream_keys(keys, randomness.CORRUPTION_TOKENS)
        replacements = jax.vmap(lambda key: jax.random.randint(key, (length,), 0, vocab_size, clean_ids.dtype))(
            token_keys)
    else:
        replacements = jnp.full_like(clean_ids, settings.mask_token_id)
    return Corruption(noised_ids=jnp.where(noise_mask, replacements, clean_ids), noise_mask=noise_mask,
                      rate=rates)
