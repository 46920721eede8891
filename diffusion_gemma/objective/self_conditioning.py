"""The two-pass self-conditioning rule of training (docs/TRAINING.md §5).

Pass 1 denoises the canvas with a zero self-conditioning signal and is detached; pass 2 reads pass 1's raw fp32
logits, switched on per example by a coin. Only pass 2 is differentiable and scored. "Off" is a zero soft
embedding (`self_conditioning_mask` False), never zero logits, whose softmax would be the vocabulary-mean
embedding (google-deepmind/gemma#773).
"""

from __future__ import annotations

from typing import Callable

import jax

from diffusion_gemma.objective import randomness

# decode(self_conditioning_logits [B, C, V] | None, self_conditioning_mask [B] | None) -> logits [B, C, V]
DecodeFn = Callable[[jax.Array | None, jax.Array | None], jax.Array]


def sample_coins(keys: jax.Array, probability: float) -> jax.Array:
    """keys [B] -> bool [B]: whether each example's pass 2 is self-conditioned (one coin per example)."""
    coin_keys = randomness.stream_keys(keys, randomness.SELF_CONDITIONING_COIN)
    return jax.vmap(lambda key: jax.random.bernoulli(key, probability))(coin_keys)


def two_pass_logits(decode: DecodeFn, coins: jax.Array) -> jax.Array:
    """Pass 1 without self-conditioning, detached; pass 2 fed pass 1's logits where `coins` [B] is True.

    Returns pass 2's logits [B, C, V], the only ones to score.
    """
    first_pass = jax.lax.stop_gradient(decode(None, None))
    return decode(first_pass, coins)
