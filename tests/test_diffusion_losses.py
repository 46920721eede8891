"""Loss terms and metrics against hand computations on small examples."""

import jax.numpy as jnp
import numpy as np

from diffusion_gemma.objective import losses


def _log_softmax(row):
    row = np.asarray(row, np.float64)
    return row - np.log(np.sum(np.exp(row)))


LOGITS = np.array([[[2.0, 0.5, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
                   [[-2.0, 4.0, 0.0], [0.3, -0.2, 0.1], [5.0, -5.0, 0.0]]], np.float32)     # [B=2, C=3, V=3]
TARGETS = np.array([[0, 1, 2], [1, 0, 2]])
MASK = np.array([[True, True, False], [True, False, True]])


def test_diffusion_loss_is_summed_cross_entropy_over_scored_positions():
    """The objective's diffusion term: token cross-entropy summed over the scored canvas positions."""
    token_losses = losses.token_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS))
    total, count = losses.masked_sum(token_losses, jnp.asarray(MASK))
    expected = -sum(_log_softmax(LOGITS[b, c])[TARGETS[b, c]] for b in range(2) for c in range(3) if MASK[b, c])
    assert int(count) == 4
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_next_token_loss_counts_pairs_of_real_positions():
    # Row 0: 3 real tokens -> pairs (0,1), (1,2); row 1: 2 real tokens -> pair (0,1); the last logit row unused.
    logits = LOGITS[:, :2]                                                                     # [B, S-1, V]
    ids = np.array([[2, 0, 1], [1, 2, 0]])
    real = np.array([[True, True, True], [True, True, False]])
    losses_by_pair = {(b, i): -_log_softmax(logits[b, i])[ids[b, i + 1]] for b, i in [(0, 0), (0, 1), (1, 0)]}
    total, count = losses.next_token_loss_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(real))
    assert int(count) == 3
    np.testing.assert_allclose(float(total), sum(losses_by_pair.values()), rtol=1e-6)
    total, count = losses.next_token_loss_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(real),
                                               per_example=True)
    assert int(count) == 2
    expected = (losses_by_pair[0, 0] + losses_by_pair[0, 1]) / 2 + losses_by_pair[1, 0]
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_per_example_mean_skips_examples_without_pairs():
    logits = jnp.zeros((2, 3, 5))
    ids = jnp.zeros((2, 4), jnp.int32)
    real = jnp.asarray([[True, True, False, False], [True, False, False, False]])
    total, count = losses.next_token_loss_sums(logits, ids, real, per_example=True)
    assert int(count) == 1
    np.testing.assert_allclose(float(total), np.log(5), rtol=1e-6)


def test_accuracy_counts_argmax_hits():
    hits, count = losses.accuracy_sums(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(MASK))
    # argmax: [[0, 2, 0], [1, 0, 0]] against targets [[0, 1, 2], [1, 0, 2]] on the mask -> hits (0,0), (1,0).
    assert (float(hits), int(count)) == (2.0, 4)


def test_rate_buckets_split_the_loss_by_example_rate():
    token_losses = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    sums, counts = losses.rate_bucket_sums(token_losses, jnp.asarray(MASK), jnp.asarray([0.3, 0.99]), 4)
    np.testing.assert_allclose(np.asarray(sums), [0.0, 3.0, 0.0, 10.0])
    np.testing.assert_array_equal(np.asarray(counts), [0, 2, 0, 2])


def test_finalize_divides_sums_by_counts_and_tolerates_empty_metrics():
    means = losses.finalize_metrics({"loss": (jnp.asarray(6.0), jnp.asarray(4)),
                                     "empty": (jnp.asarray(0.0), jnp.asarray(0))})
    assert float(means["loss"]) == 1.5 and float(means["empty"]) == 0.0
