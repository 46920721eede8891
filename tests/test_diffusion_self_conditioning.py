"""The two-pass rule on a toy decoder (the rule is a function of the decode function), and the coins."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_gemma.objective import randomness
from diffusion_gemma.objective.self_conditioning import sample_coins, two_pass_logits

BATCH, CANVAS, VOCAB = 4, 3, 5


def _toy_decoder(params, canvas):
    """logits = tanh(E[canvas] @ W) + mask * softmax(sc_logits) @ E @ W: pass 1 and pass 2 both depend on params."""

    def decode(self_conditioning_logits, self_conditioning_mask):
        embeds = params["embedding"][canvas]                                                     # [B, C, V]
        if self_conditioning_logits is not None:
            soft = jax.nn.softmax(self_conditioning_logits, axis=-1) @ params["embedding"]
            embeds = embeds + soft * self_conditioning_mask[:, None, None]
        return jnp.tanh(embeds @ params["kernel"])

    return decode


def _setup():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"embedding": jax.random.normal(keys[0], (VOCAB, VOCAB)),
              "kernel": jax.random.normal(keys[1], (VOCAB, VOCAB))}
    canvas = jax.random.randint(keys[2], (BATCH, CANVAS), 0, VOCAB)
    weights = jax.random.normal(keys[3], (BATCH, CANVAS, VOCAB))
    coins = jnp.asarray([True, False, True, True])
    return params, canvas, weights, coins


def test_pass_one_receives_no_gradient():
    params, canvas, weights, coins = _setup()

    def loss(params):
        return jnp.sum(two_pass_logits(_toy_decoder(params, canvas), coins) * weights)

    first_pass = jax.jit(_toy_decoder(params, canvas))(None, None)

    def loss_with_constant_first_pass(params):
        return jnp.sum(_toy_decoder(params, canvas)(first_pass, coins) * weights)

    def loss_through_both_passes(params):
        decode = _toy_decoder(params, canvas)
        return jnp.sum(decode(decode(None, None), coins) * weights)

    ours = jax.jit(jax.grad(loss))(params)
    expected = jax.jit(jax.grad(loss_with_constant_first_pass))(params)
    leaky = jax.jit(jax.grad(loss_through_both_passes))(params)
    for name in params:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, atol=1e-5)
        assert not np.allclose(ours[name], leaky[name], rtol=1e-3, atol=1e-4)


def test_pass_one_is_unconditioned_and_pass_two_reads_it_under_the_coins():
    params, canvas, _, coins = _setup()
    calls = []

    def recording_decode(logits, mask):
        calls.append((logits, mask))
        return _toy_decoder(params, canvas)(logits, mask)

    second = two_pass_logits(recording_decode, coins)
    assert calls[0] == (None, None)
    first = _toy_decoder(params, canvas)(None, None)
    np.testing.assert_array_equal(calls[1][0], first)
    np.testing.assert_array_equal(calls[1][1], coins)
    np.testing.assert_array_equal(second, _toy_decoder(params, canvas)(first, coins))


def test_coins_follow_the_probability_and_the_example_key():
    keys = randomness.example_keys(jax.random.key(1), jnp.arange(20_000))
    coins = np.asarray(jax.jit(sample_coins, static_argnums=1)(keys, 0.5))
    assert abs(coins.mean() - 0.5) < 5 * np.sqrt(0.25 / coins.size)
    np.testing.assert_array_equal(np.asarray(jax.jit(sample_coins, static_argnums=1)(keys[7:9], 0.5)), coins[7:9])
    assert not np.asarray(jax.jit(sample_coins, static_argnums=1)(keys, 0.0)).any()
    assert np.asarray(jax.jit(sample_coins, static_argnums=1)(keys, 1.0)).all()
