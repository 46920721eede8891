"""Loss terms and metrics as (sum, count) pairs.

Every term is returned unnormalised together with the number of items it sums over, so the trainer can add
the pairs over micro-batches and devices and divide ONCE by the global count: the result is then exactly the
loss of the whole global batch, whatever its split (docs/TRAINING.md §6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SumAndCount = tuple[jax.Array, jax.Array]


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V] (fp32, already softcapped), targets [...] -> -log softmax(logits)[target], fp32 [...]."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def masked_sum(values: jax.Array, mask: jax.Array) -> SumAndCount:
    """(sum of values where mask, number of such positions as int32)."""
    mask = mask.astype(bool)
    return jnp.sum(jnp.where(mask, values, 0.0)), jnp.sum(mask, dtype=jnp.int32)


def next_token_pairs(attention_mask: jax.Array, target_mask: jax.Array | None = None) -> jax.Array:
    """[B, S-1] bool: the AR pairs (p, p + 1) that count, both positions real and, with `target_mask` [B, S],
    the predicted token p + 1 inside it (e.g. the response only, so no loss goes to predicting the prompt)."""
    real = attention_mask.astype(bool)
    pairs = real[:, :-1] & real[:, 1:]
    return pairs if target_mask is None else pairs & target_mask[:, 1:].astype(bool)


def next_token_loss_sums(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                         per_example: bool = False, target_mask: jax.Array | None = None) -> SumAndCount:
    """Autoregressive loss of the encoder: logits [B, S-1, V] at positions 0..S-2 predict input_ids[:, 1:].

    Only the pairs of `next_token_pairs` count. Token mean (default): (sum over pairs, pair count).
    Per-example mean (Google's JAX recipe): (sum over examples of their mean, number of examples with a pair).
    """
    token_losses = token_cross_entropy(logits, input_ids[:, 1:])                               # [B, S-1]
    pairs = next_token_pairs(attention_mask, target_mask)
    if not per_example:
        return masked_sum(token_losses, pairs)
    example_sums = jnp.sum(jnp.where(pairs, token_losses, 0.0), axis=1)
    example_pairs = jnp.sum(pairs, axis=1)
    has_pairs = example_pairs > 0
    example_means = example_sums / jnp.maximum(example_pairs, 1)
    return masked_sum(example_means, has_pairs)


def accuracy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> SumAndCount:
    """(number of argmax hits, number of positions) over mask [B, C]."""
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return masked_sum(hits, mask)


def rate_bucket_sums(token_losses: jax.Array, mask: jax.Array, rates: jax.Array,
                     num_buckets: int) -> SumAndCount:
    """Loss split by the example's corruption rate t in equal buckets of [0, 1).

    token_losses, mask [B, C]; rates [B] -> (sums [K], counts [K]).
    """
    buckets = jnp.clip(jnp.floor(rates * num_buckets).astype(jnp.int32), 0, num_buckets - 1)
    one_hot = jax.nn.one_hot(buckets, num_buckets, dtype=jnp.float32)                           # [B, K]
    mask = mask.astype(bool)
    sums = jnp.einsum("bc,bk->k", jnp.where(mask, token_losses, 0.0), one_hot)                 # [K]
    counts = jnp.einsum("bc,bk->k", mask.astype(jnp.int32), one_hot.astype(jnp.int32))          # [K]
    return sums, counts


def mean_of(sum_and_count: SumAndCount) -> jax.Array:
    """sum / count, 0 when nothing was counted."""
    total, count = sum_and_count
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def finalize_metrics(metric_sums: dict[str, SumAndCount]) -> dict[str, jax.Array]:
    """Means of (sum, count) metrics already added over micro-batches / devices."""
    return {name: mean_of(pair) for name, pair in metric_sums.items()}
