"""The pure step math of the sampler against the reference's own pieces (transformers' generation classes), bit
for bit where the reference's arithmetic allows it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_gemma.sampling import steps

torch = pytest.importorskip("torch", reason="reference-parity dependency (pip install -e .[dev])")
gen = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")


def test_temperature_schedule_is_the_references_divisor_bit_for_bit():
    """Dividing by our host-side table reproduces the reference's LinearTemperatureScheduleLogitsProcessor (which
    evaluates the schedule from an int32 step tensor) bit for bit at every step."""
    for t_min, t_max, steps_total in [(0.4, 0.8, 48), (1e-4, 2e-4, 48), (0.3, 1.7, 7), (1.5, 1.5, 64)]:
        processor = gen.LinearTemperatureScheduleLogitsProcessor(t_min, t_max, steps_total)
        ours = steps.temperature_schedule(t_min, t_max, steps_total)
        assert ours.dtype == np.float32 and ours.shape == (steps_total,) and np.isclose(ours[0], t_max)
        logits = torch.randn(2, 3, 17) * 20
        for taken in range(steps_total):
            remaining = torch.tensor(steps_total - taken, dtype=torch.int32)
            reference = processor(None, logits, cur_step=remaining).numpy()
            np.testing.assert_array_equal(logits.numpy() / ours[taken], reference)


def test_apply_temperature_is_a_true_division_under_jit():
    logits = np.random.default_rng(0).normal(size=(4, 8, 257)).astype(np.float32) * 30
    temperatures = steps.temperature_schedule(0.4, 0.8, 48)
    divide = jax.jit(lambda x, t, i: steps.apply_temperature(x, t[i]))
    for index in (0, 5, 31, 47):
        np.testing.assert_array_equal(np.asarray(divide(logits, temperatures, index)), logits / temperatures[index])


def test_cumsum_matches_torch_cpu_double_accumulation():
    """On what the sampler sums (non-negative entropies sorted ascending, any magnitudes) the double-float scan
    rounds exactly like torch's float64 accumulator; a plain fp32 cumsum does not."""
    rng = np.random.default_rng(1)
    values = rng.exponential(size=(6, 256)) * 10 ** rng.uniform(-6, 2, size=(6, 256))
    values = np.sort(np.concatenate([values, np.array([[1.0] + [0.1] * 255])]), axis=-1).astype(np.float32)
    values[-1] = np.array([1.0] + [0.1] * 255, np.float32)
    ours = np.asarray(jax.jit(steps.cumsum_wide_accumulator)(values))
    reference = torch.cumsum(torch.from_numpy(values), dim=-1).numpy()
    np.testing.assert_array_equal(ours, reference)
    assert not np.array_equal(np.cumsum(values[-1], dtype=np.float32), reference[-1])


def test_token_entropy_matches_categorical_entropy():
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(3, 16, 64)) * np.array([0.1, 5.0, 400.0])[:, None, None]).astype(np.float32)
    ours = np.asarray(jax.jit(steps.token_entropy)(logits))
    reference = torch.distributions.Categorical(logits=torch.from_numpy(logits)).entropy().numpy()
    np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=1e-7)
    assert np.all(np.isfinite(ours))


def test_entropy_bound_acceptance_matches_the_reference_sampler():
    rng = np.random.default_rng(3)
    sampler = gen.EntropyBoundSampler(gen.EntropyBoundSamplerConfig(entropy_bound=0.1), canvas_length=32,
                                      vocab_size=50, max_denoising_steps=48)
    accept = jax.jit(steps.entropy_bound_acceptance)
    for scale in (1.0, 8.0, 30.0, 200.0):
        logits = torch.from_numpy((rng.normal(size=(4, 32, 50)) * scale).astype(np.float32))
        canvas = torch.zeros(4, 32, dtype=torch.long)
        sampler.accept_canvas(canvas, canvas + 1, logits, 1)
        entropy = torch.distributions.Categorical(logits=logits).entropy().numpy()
        ours = np.asarray(accept(entropy, 0.1))
        np.testing.assert_array_equal(ours, sampler.accepted_token_mask.numpy())
        assert ours.sum(-1).min() >= 1  # the lowest-entropy position is always accepted
    everything = np.asarray(accept(rng.uniform(size=(2, 32)).astype(np.float32), 1e6))
    assert everything.all()


@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
def test_stable_and_confident_matches_the_reference_criterion(threshold):
    rng = np.random.default_rng(4 + threshold)
    reference = gen.StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.5)
    capacity = max(threshold, 2) + 1  # a longer history than needed must not change the rule
    history = jnp.full((capacity, 3, 6), -1, jnp.int32)
    rule = jax.jit(steps.stable_and_confident)
    canvas = rng.integers(0, 4, size=(3, 6))
    for _ in range(12):
        changed = rng.uniform(size=(3, 1)) < 0.35
        canvas = np.where(changed, rng.integers(0, 4, size=(3, 6)), canvas)
        logits = rng.normal(size=(3, 6, 5)).astype(np.float32) * rng.choice([0.1, 20.0], size=(3, 1, 1))
        expected = reference(torch.from_numpy(canvas), torch.from_numpy(logits)).numpy()
        entropy = steps.token_entropy(logits)
        stop, history = rule(history, jnp.asarray(canvas, jnp.int32), jnp.mean(entropy, -1), threshold, 0.5)
        np.testing.assert_array_equal(np.asarray(stop), expected)


def _reference_finalize(canvas, finished, eos, pad):
    config = gen.DiffusionGemmaGenerationConfig(eos_token_id=eos, pad_token_id=pad)
    criteria = gen.StoppingCriteriaList([gen.EosTokenCriteria(eos)])
    prompt = torch.zeros(canvas.shape[0], 3, dtype=torch.long)
    input_ids = torch.cat([prompt, torch.from_numpy(canvas)], dim=-1)
    out, now = gen.DiffusionGemmaGenerationMixin._finalize_canvas(input_ids, torch.from_numpy(finished), config,
                                                                   criteria, canvas.shape[1], torch.tensor(eos))
    return out[:, 3:].numpy(), now.numpy()


@pytest.mark.parametrize("pad", [0, None])
def test_finalize_canvas_matches_the_reference(pad):
    canvas = np.array([[5, 1, 7, 1, 9],     # EOS at 1: pads after it, including the second EOS
                       [5, 6, 7, 8, 9],     # no EOS
                       [5, 6, 3, 8, 9],     # the other EOS id
                       [1, 6, 7, 8, 9],     # finished earlier: fully padded
                       [2, 2, 2, 2, 1]])    # EOS last
    finished = np.array([False, False, False, True, False])
    eos = [1, 3]
    expected_canvas, expected_finished = _reference_finalize(canvas.copy(), finished, eos, pad)
    ours_canvas, ours_finished = steps.finalize_canvas(jnp.asarray(canvas), jnp.asarray(finished),
                                                       jnp.asarray(eos + [-1, -1]), pad)
    np.testing.assert_array_equal(np.asarray(ours_canvas), expected_canvas)
    np.testing.assert_array_equal(np.asarray(ours_finished), expected_finished)
    if pad is not None:  # the dynamic switch used inside the jitted sampler
        kept, _ = steps.finalize_canvas(jnp.asarray(canvas), jnp.asarray(finished), jnp.asarray(eos), pad,
                                        use_pad=jnp.bool_(False))
        np.testing.assert_array_equal(np.asarray(kept), canvas)


def test_sample_from_uniform_is_the_inverse_cdf():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(200, 0.3), size=(4, 16)).astype(np.float32)
    probs[..., 10:30] = 0.0  # a zero-mass run, spanning whole blocks
    uniforms = rng.uniform(size=(4, 16)).astype(np.float32)
    ours = np.asarray(jax.jit(steps.sample_from_uniform)(probs, uniforms))
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    expected = np.sum(cdf <= (uniforms * cdf[..., -1])[..., None], axis=-1)
    np.testing.assert_array_equal(ours, expected)
    assert np.all(np.take_along_axis(probs, ours[..., None], -1) > 0)


def test_sample_from_uniform_edge_cases_never_pick_zero_mass():
    one_hot = np.zeros((3, 100), np.float32)
    one_hot[0, 0], one_hot[1, 99], one_hot[2, 57] = 1.0, 1.0, 1.0
    for u in (0.0, 0.5, np.nextafter(np.float32(1), np.float32(0))):
        drawn = np.asarray(steps.sample_from_uniform(one_hot, np.full((3,), u, np.float32)))
        np.testing.assert_array_equal(drawn, [0, 99, 57])


def test_sample_from_uniform_distribution():
    probs = np.array([0.5, 0.25, 0.125, 0.125, 0.0, 0.0, 0.0], np.float32)
    uniforms = jax.random.uniform(jax.random.key(0), (20000,))
    drawn = np.asarray(steps.sample_from_uniform(jnp.broadcast_to(probs, (20000, 7)), uniforms))
    frequencies = np.bincount(drawn, minlength=7) / 20000
    np.testing.assert_allclose(frequencies, probs, atol=0.012)


def test_confidence_and_top_k_acceptance():
    confidence = jnp.asarray([[0.95, 0.2, 0.91, 0.5], [0.1, 0.3, 0.2, 0.05]])
    np.testing.assert_array_equal(np.asarray(steps.confidence_acceptance(confidence, 0.9)),
                                  [[True, False, True, False], [False, True, False, False]])  # top-1 at least
    np.testing.assert_array_equal(np.asarray(steps.top_k_acceptance(confidence, 2)),
                                  [[True, False, True, False], [False, True, True, False]])
    assert np.asarray(steps.top_k_acceptance(confidence, 4)).all()


def test_top_two_margin_on_hand_made_probabilities():
    probs = jnp.asarray([[[0.5, 0.45, 0.05, 0.0], [0.5, 0.05, 0.05, 0.4], [0.0, 0.0, 1.0, 0.0],
                          [0.3, 0.1, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]]])
    np.testing.assert_allclose(np.asarray(steps.top_two_margin(probs)), [[0.05, 0.1, 1.0, 0.0, 0.0]], atol=1e-7)
    rng = np.random.default_rng(6)
    random = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 7, 50)) * 4, jnp.float32), axis=-1)
    ranked = -np.sort(-np.asarray(random), axis=-1)
    np.testing.assert_array_equal(np.asarray(jax.jit(steps.top_two_margin)(random)), ranked[..., 0] - ranked[..., 1])


def test_margin_acceptance_threshold_edge_and_ties():
    margin = jnp.asarray([[0.5, 0.2, 0.5, 0.49999997],      # margins equal to the threshold are accepted
                          [0.1, 0.3, 0.3, 0.05],             # none reaches it: only the first largest
                          [0.3, 0.3, 0.3, 0.3],              # all tied below it: the first one alone
                          [1.0, 1.0, 1.0, 1.0]],             # every position already certain: all of them
                         jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(steps.margin_acceptance)(margin, 0.5)),
                                  [[True, False, True, False], [False, True, False, False],
                                   [True, False, False, False], [True, True, True, True]])
    # Threshold 1: strict largest-first order, one position per step unless several are exactly one-hot.
    strict = np.asarray(steps.margin_acceptance(margin, 1.0))
    np.testing.assert_array_equal(strict.sum(-1), [1, 1, 1, 4])
    assert strict[0, 0] and strict[1, 1]


def test_every_rule_accepts_at_least_one_position_per_row():
    """The entropy bound (its lowest-entropy position), confidence (its most confident), top-k (k >= 1) and the
    margin rule (its largest margin) all make progress at every step, whatever the threshold."""
    rng = np.random.default_rng(7)
    for scale in (0.1, 3.0, 50.0):
        logits = jnp.asarray(rng.normal(size=(4, 16, 11)) * scale, jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        confidence = jnp.max(probs, axis=-1)
        margin = steps.top_two_margin(probs)
        for accepted in (steps.entropy_bound_acceptance(steps.token_entropy(logits), 1e-9),
                         steps.confidence_acceptance(confidence, 1.0), steps.top_k_acceptance(confidence, 1),
                         steps.margin_acceptance(margin, 1.0), steps.margin_acceptance(margin, 0.2)):
            assert np.asarray(accepted).sum(-1).min() >= 1
    ties = jnp.zeros((2, 5), jnp.float32)  # a uniform distribution everywhere: every margin 0
    assert np.asarray(steps.margin_acceptance(ties, 0.5)).sum(-1).tolist() == [1, 1]


def test_the_sampler_step_dispatches_the_margin_rule():
    """`acceptance="margin"` in the jitted step keeps exactly the positions `margin_acceptance` picks from the
    temperature-scaled probabilities; the other rules are unaffected by accept_margin."""
    from diffusion_gemma.sampling import sampler as sampler_lib

    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(2, 12, 9)) * 3, jnp.float32)
    uniform = jnp.asarray(rng.uniform(size=(2, 12)), jnp.float32)
    renoise = jnp.full((2, 12), -1, jnp.int32)
    step = jax.jit(sampler_lib._step_math)

    def accepted(**changes):
        config = sampler_lib.SamplerConfig(max_denoising_steps=4, **changes)
        _, knobs = sampler_lib._plan_and_knobs(config, canvas_length=12)
        knobs = dict(knobs, temperatures_now=knobs["temperatures"][1])
        return np.asarray(step(logits, uniform, renoise, knobs)[2]), knobs

    for threshold in (0.05, 0.4, 1.0):
        ours, knobs = accepted(acceptance="margin", accept_margin=threshold)
        probs = jax.nn.softmax(steps.apply_temperature(logits, knobs["temperatures_now"]), axis=-1)
        expected = np.asarray(steps.margin_acceptance(steps.top_two_margin(probs), threshold))
        np.testing.assert_array_equal(ours, expected)
    assert 0 < accepted(acceptance="margin", accept_margin=0.4)[0].sum() < logits.shape[0] * logits.shape[1]
    np.testing.assert_array_equal(accepted(accept_margin=0.1)[0], accepted(accept_margin=1.0)[0])


def test_margin_rule_settings():
    from diffusion_gemma.sampling.sampler import ACCEPTANCE_RULES, SamplerConfig

    assert "margin" in ACCEPTANCE_RULES and SamplerConfig().acceptance == "entropy_bound"
    config = SamplerConfig.from_generation_config({"max_denoising_steps": 12}, acceptance="margin",
                                                  accept_margin=0.7)
    assert (config.acceptance, config.accept_margin, config.max_denoising_steps) == ("margin", 0.7, 12)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="accept_margin"):
            SamplerConfig(acceptance="margin", accept_margin=bad)
    with pytest.raises(ValueError, match="acceptance"):
        SamplerConfig(acceptance="top_margin")


def test_tokens_per_forward():
    generated = np.array([[4, 5, 0, 0], [4, 5, 6, 7]])
    np.testing.assert_allclose(steps.tokens_per_forward(generated, np.array([4, 2]), 0), [0.5, 2.0])
    np.testing.assert_allclose(steps.tokens_per_forward(generated, np.array([4, 2]), None), [1.0, 2.0])
