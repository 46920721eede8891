"""Statistical tests of the noising process: fixed seeds, large batches, tolerances of several sigmas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_gemma.objective import randomness
from diffusion_gemma.objective.corruption import ABSORBING, CorruptionSettings, corrupt

VOCAB = 64
BATCH, LENGTH = 4096, 48
SMALL = 256
jit_corrupt = jax.jit(corrupt, static_argnames=("vocab_size", "settings"))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    clean = jnp.asarray(rng.integers(0, VOCAB, (BATCH, LENGTH)), jnp.int32)
    supervised = jnp.asarray(rng.random((BATCH, LENGTH)) < 0.6)
    keys = randomness.example_keys(jax.random.key(seed), jnp.arange(BATCH))
    return clean, supervised, keys


@pytest.fixture(scope="module")
def uniform_run():
    clean, supervised, keys = _data()
    out = jit_corrupt(clean, supervised, keys, vocab_size=VOCAB, settings=CorruptionSettings())
    return clean, supervised, out


def test_rates_are_uniform_between_eps_and_one(uniform_run):
    rates = np.asarray(uniform_run[2].rate)
    assert rates.min() >= 1e-3 and rates.max() < 1.0
    counts, _ = np.histogram(rates, bins=10, range=(1e-3, 1.0))
    expected = BATCH / 10
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_corruption_rate_matches_t(uniform_run):
    _, supervised, out = uniform_run
    supervised, noise, rates = np.asarray(supervised), np.asarray(out.noise_mask), np.asarray(out.rate)
    per_example_supervised = supervised.sum(1)
    noised = noise.sum(1)
    # Sum of Binomial(n_b, t_b) residuals, standardised: ~N(0, 1) if every position flips with prob t_b.
    residual = np.sum(noised - rates * per_example_supervised)
    sigma = np.sqrt(np.sum(per_example_supervised * rates * (1 - rates)))
    assert abs(residual / sigma) < 5
    # And per rate range, not only on average.
    for low in np.arange(0.0, 1.0, 0.25):
        rows = (rates >= low) & (rates < low + 0.25)
        fraction = noised[rows].sum() / per_example_supervised[rows].sum()
        assert abs(fraction - rates[rows].mean()) < 0.02


def test_unsupervised_positions_are_never_touched(uniform_run):
    clean, supervised, out = uniform_run
    unsupervised = ~np.asarray(supervised)
    assert not np.asarray(out.noise_mask)[unsupervised].any()
    np.testing.assert_array_equal(np.asarray(out.noised_ids)[unsupervised], np.asarray(clean)[unsupervised])
    # Positions outside the noise mask are clean too.
    untouched = ~np.asarray(out.noise_mask)
    np.testing.assert_array_equal(np.asarray(out.noised_ids)[untouched], np.asarray(clean)[untouched])


def test_replacements_are_uniform_over_the_vocabulary(uniform_run):
    clean, _, out = uniform_run
    noise = np.asarray(out.noise_mask)
    draws = np.asarray(out.noised_ids)[noise]
    observed = np.bincount(draws, minlength=VOCAB)
    expected = draws.size / VOCAB
    chi_square = np.sum((observed - expected) ** 2 / expected)
    dof = VOCAB - 1
    assert chi_square < dof + 5 * np.sqrt(2 * dof)
    # The draw may equal the clean token, with probability 1/V.
    kept = np.mean(draws == np.asarray(clean)[noise])
    assert abs(kept - 1 / VOCAB) < 5 * np.sqrt(1 / VOCAB / draws.size)


def test_noise_is_independent_of_batch_split_and_order():
    clean, supervised, _ = _data(1)
    clean, supervised = np.asarray(clean[:12]), np.asarray(supervised[:12])
    indices = np.arange(100, 112)

    @jax.jit
    def run(clean_rows, supervised_rows, index_rows):
        keys = randomness.example_keys(jax.random.key(7), index_rows)
        return corrupt(clean_rows, supervised_rows, keys, vocab_size=VOCAB, settings=CorruptionSettings())

    def run_rows(rows):
        return jax.device_get(run(clean[rows], supervised[rows], indices[rows]))

    whole = run_rows(np.arange(12))
    parts = [run_rows(np.arange(0, 5)), run_rows(np.arange(5, 12))]
    for field in ("noised_ids", "noise_mask", "rate"):
        joined = np.concatenate([getattr(part, field) for part in parts])
        np.testing.assert_array_equal(joined, getattr(whole, field))
    permutation = np.random.default_rng(0).permutation(12)
    np.testing.assert_array_equal(run_rows(permutation).noised_ids, whole.noised_ids[permutation])


def test_absorbing_variant_writes_the_mask_id():
    clean, supervised, keys = _data(2)
    mask_id = VOCAB - 1
    clean = jnp.minimum(clean, VOCAB - 2)
    out = jit_corrupt(clean[:SMALL], supervised[:SMALL], keys[:SMALL], vocab_size=VOCAB,
                      settings=CorruptionSettings(kind=ABSORBING, mask_token_id=mask_id))
    noise = np.asarray(out.noise_mask)
    assert noise.any()
    np.testing.assert_array_equal(np.asarray(out.noised_ids) == mask_id, noise)
    assert not noise[~np.asarray(supervised[:SMALL])].any()


def test_nothing_supervised_means_nothing_corrupted():
    clean, supervised, keys = _data(3)
    out = jit_corrupt(clean[:SMALL], jnp.zeros_like(supervised[:SMALL]), keys[:SMALL], vocab_size=VOCAB,
                      settings=CorruptionSettings(eps=0.99))
    np.testing.assert_array_equal(np.asarray(out.noised_ids), np.asarray(clean[:SMALL]))


def test_rate_near_one_corrupts_every_supervised_position():
    clean, supervised, keys = _data(4)
    out = jit_corrupt(clean[:SMALL], supervised[:SMALL], keys[:SMALL], vocab_size=VOCAB,
                      settings=CorruptionSettings(eps=0.9999))
    np.testing.assert_array_equal(np.asarray(out.noise_mask), np.asarray(supervised[:SMALL]))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="mask_token_id"):
        CorruptionSettings(kind=ABSORBING)
    with pytest.raises(ValueError, match="kind"):
        CorruptionSettings(kind="gaussian")
