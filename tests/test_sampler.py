"""The jitted sampler against transformers' `DiffusionGemmaForBlockDiffusion.generate`, token for token, on a tiny
random checkpoint; plus the invariances of the strategies the reference does not have.

Exactness (docs/SAMPLING.md §7 "Making the sampler testable"): either no randomness matters (one block, a fixed initial
canvas, near-zero temperatures, everything accepted), or the reference's draws are replayed from our
`NoiseTape`: its `EntropyBoundSampler.initialize_canvas` (one full canvas at the start of every block, drawn even
when a canvas is supplied, then one per step for renoising) and `torch.multinomial` (one per step, replaced by
the same inverse-CDF draw from the tape's uniform) are patched during `generate`. The tape is indexed by
(block, step), so the reference's extra steps for rows it keeps denoising after they finished do not shift it.

The checkpoint's embedding is scaled up so its predictions are peaked enough for rows to become confident and
stop early with the default thresholds (a plain random model never does). The reference runs with sdpa
attention (its eager path fails on left-padded batches). Two compiled programs serve the whole module: one
block with callbacks attached, and three blocks without.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference-parity dependency (pip install -e .[dev])")
pytest.importorskip("transformers", reason="reference-parity dependency (pip install -e .[dev])")

from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_generation  # noqa: E402

from diffusion_gemma.checkpoints.hf import load_hf  # noqa: E402
from diffusion_gemma.sampling import sampler as sampler_lib  # noqa: E402
from diffusion_gemma.sampling.sampler import NoiseTape, SamplerConfig, generate, left_pad  # noqa: E402
from hf_reference import FULL, SLIDING, make_reference  # noqa: E402

CANVAS = 8
VOCAB = 128
EMBED_SCALE = 60.0
PROMPTS = [[5, 6, 7, 9, 11], [8, 3, 12]]  # left-padded to 5
PAD = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sampler_ref"))
    reference, _ = make_reference(path, seed=0, layers=2, layer_types=[SLIDING, FULL], canvas_length=CANVAS,
                                  vocab_size=VOCAB, attn_implementation="sdpa")
    with torch.no_grad():
        reference.model.decoder.embed_tokens.weight.mul_(EMBED_SCALE)
    reference.save_pretrained(path)
    return reference, load_hf(path)


@pytest.fixture(scope="module")
def prompts():
    return left_pad(PROMPTS, PAD)


# ------------------------------------------------------------------------------------ running the reference
@contextlib.contextmanager
def replay(tape: NoiseTape, *, greedy: bool = False):
    """Serve the reference's random draws from `tape` (see the module docstring)."""
    initial, uniforms, renoise = (np.asarray(x) for x in (tape.initial_canvas, tape.uniforms, tape.renoise))
    position = dict(block=-1, step=0, last=None)

    def initialize_canvas(self, batch_size, device):
        if position["last"] == "draw":  # renoising after step `step`
            out = renoise[position["block"], position["step"] - 1]
        else:  # a new block
            position["block"] += 1
            position["step"] = 0
            out = initial[position["block"]]
        position["last"] = "randint"
        return torch.from_numpy(out.astype(np.int64))

    def multinomial(probs, num_samples, **unused):
        position["step"] += 1
        position["last"] = "draw"
        if greedy:
            return probs.argmax(-1, keepdim=True)
        uniform = torch.from_numpy(uniforms[position["block"], position["step"] - 1].reshape(-1).astype(np.float64))
        cdf = probs.double().cumsum(-1)
        return (cdf <= (uniform * cdf[:, -1])[:, None]).sum(-1).clamp(max=probs.shape[-1] - 1)[:, None]

    saved = hf_generation.EntropyBoundSampler.initialize_canvas, torch.multinomial
    hf_generation.EntropyBoundSampler.initialize_canvas, torch.multinomial = initialize_canvas, multinomial
    try:
        yield position
    finally:
        hf_generation.EntropyBoundSampler.initialize_canvas, torch.multinomial = saved


def reference_generate(reference, prompts, config: SamplerConfig, *, tape: NoiseTape | None = None,
                       initial_canvas=None, greedy: bool = False, confidence_threshold=None):
    """transformers' generate with our config's settings -> (sequences, tokens_per_forward)."""
    ids, mask = prompts
    kwargs = dict(max_new_tokens=config.max_new_tokens, max_denoising_steps=config.max_denoising_steps,
                  sampler_config=hf_generation.EntropyBoundSamplerConfig(entropy_bound=float(config.entropy_bound)),
                  t_min=config.t_min, t_max=config.t_max, stability_threshold=config.stability_threshold,
                  confidence_threshold=confidence_threshold or config.confidence_threshold,
                  eos_token_id=list(config.eos_token_ids) or None, pad_token_id=config.pad_token_id)
    if initial_canvas is not None:
        kwargs["decoder_input_ids"] = torch.from_numpy(np.asarray(initial_canvas, np.int64))
    context = replay(tape, greedy=greedy) if tape is not None else contextlib.nullcontext()
    with context, torch.no_grad():
        out = reference.generate(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                                 **kwargs)
    return out.sequences.numpy(), out.tokens_per_forward.numpy()


def assert_same(ours: sampler_lib.GenerationResult, sequences, tokens_per_forward):
    np.testing.assert_array_equal(ours.sequences(), sequences)
    np.testing.assert_allclose(ours.tokens_per_forward(), tokens_per_forward, rtol=1e-6)


def tape_for(config: SamplerConfig, seed: int) -> NoiseTape:
    return NoiseTape.draw(jax.random.key(seed), batch_size=len(PROMPTS), num_blocks=config.num_blocks(CANVAS),
                          num_steps=config.max_denoising_steps, canvas_length=CANVAS, vocab_size=VOCAB)


THREE_BLOCKS = SamplerConfig(max_new_tokens=3 * CANVAS, pad_token_id=PAD)  # the reference's defaults otherwise


# -------------------------------------------------------------------------------- one block, no randomness
class Recorder:
    """One callback object for the whole module (each distinct callback compiles its own program)."""

    def __init__(self):
        self.steps: list[sampler_lib.StepEvent] = []
        self.canvases: list[sampler_lib.CanvasEvent] = []

    def on_step(self, event):
        self.steps.append(event)

    def on_canvas(self, event):
        self.canvases.append(event)

    def run(self, model, prompts, rng, config, **kwargs):
        self.steps, self.canvases = [], []
        return generate(model, *prompts, rng, config, on_step=self.on_step, on_canvas=self.on_canvas, **kwargs)


RECORDER = Recorder()
ONE_BLOCK = SamplerConfig(max_new_tokens=CANVAS, t_min=1e-4, t_max=2e-4, entropy_bound=1e6)


@pytest.fixture(scope="module")
def one_block(models, prompts):
    reference, model = models
    canvas = np.random.default_rng(0).integers(0, VOCAB, size=(len(PROMPTS), CANVAS))
    ours = RECORDER.run(model, prompts, jax.random.key(0), ONE_BLOCK, initial_canvas=canvas)
    return ours, list(RECORDER.steps), list(RECORDER.canvases), reference_generate(reference, prompts, ONE_BLOCK,
                                                                                   initial_canvas=canvas)


def test_one_block_fixed_canvas_matches_reference(one_block):
    ours, _, _, (sequences, tokens_per_forward) = one_block
    assert_same(ours, sequences, tokens_per_forward)
    assert int(ours.num_blocks) == 1 and 1 < ours.total_steps() < ONE_BLOCK.max_denoising_steps  # stopped early


def test_callbacks_report_every_step_and_canvas(one_block):
    ours, step_events, canvas_events, _ = one_block
    assert [e.steps_remaining for e in step_events] == list(range(48, 48 - ours.total_steps(), -1))
    assert all(e.block == 0 for e in step_events) and [e.block for e in canvas_events] == [0]
    np.testing.assert_array_equal(step_events[-1].argmax, canvas_events[0].canvas)  # no EOS configured
    np.testing.assert_array_equal(canvas_events[0].canvas, ours.generated())
    assert step_events[-1].done.all() and step_events[0].accepted.all()  # bound 1e6 accepts everything
    assert step_events[0].canvas.shape == step_events[0].argmax.shape == (len(PROMPTS), CANVAS)


# ------------------------------------------------------------------------------------ the noise-tape method
def choose_eos(sequences: np.ndarray, prompt_length: int) -> int:
    """A token of row 0's first canvas (not its first position) that row 1 never generates: with it as EOS, row 0
    finishes in block 0 while row 1 runs on."""
    row0, row1 = sequences[0, prompt_length:], sequences[1, prompt_length:]
    for position in range(2, CANVAS):
        token = int(row0[position])
        if token not in row0[:position] and token not in row1 and token != PAD:
            return token
    pytest.fail(f"no usable EOS candidate in {row0[:CANVAS]} (row 1: {row1})")


@pytest.mark.parametrize("stability_threshold", [0, 1, 2])
def test_noise_tape_three_blocks_match_reference(models, prompts, stability_threshold):
    """Default settings, batch 2 with left padding, 3 blocks; first without EOS (rows stop denoising at
    different steps), then with an EOS list that finishes row 0 in block 0 (pad after it, padded blocks after,
    row 1 continuing)."""
    reference, model = models
    config = THREE_BLOCKS.replace(stability_threshold=stability_threshold)
    tape = tape_for(config, seed=1)
    prompt_length = prompts[0].shape[1]

    sequences, tokens_per_forward = reference_generate(reference, prompts, config, tape=tape)
    ours = generate(model, *prompts, tape, config)
    assert_same(ours, sequences, tokens_per_forward)
    steps_run = np.asarray(ours.steps_per_block)
    passes = np.asarray(ours.decoder_passes)
    assert steps_run.min() < config.max_denoising_steps and passes[0] != passes[1]  # per-row early stopping

    eos = choose_eos(sequences, prompt_length)
    with_eos = config.replace(eos_token_ids=(VOCAB - 1, eos))
    sequences, tokens_per_forward = reference_generate(reference, prompts, with_eos, tape=tape)
    ours = generate(model, *prompts, tape, with_eos)
    assert_same(ours, sequences, tokens_per_forward)
    generated = ours.generated()
    first_eos = int(np.argmax(generated[0] == eos))
    assert first_eos < CANVAS and np.all(generated[0, first_eos + 1:] == PAD)
    assert np.asarray(ours.finished)[0] and int(ours.num_blocks) == 3
    assert np.any(generated[1, 2 * CANVAS:] != PAD)


@pytest.mark.parametrize("strategy", ["fixed_steps", "greedy"])
def test_fixed_steps_and_greedy_match_reference(models, prompts, strategy):
    """fixed_steps = the reference whose stop rule never fires; greedy = the reference drawing the argmax."""
    reference, model = models
    config = THREE_BLOCKS.replace(eos_token_ids=(1,))
    tape = tape_for(config, seed=2)
    if strategy == "fixed_steps":
        ours = generate(model, *prompts, tape, config.replace(early_stop=False))
        expected = reference_generate(reference, prompts, config, tape=tape, confidence_threshold=1e-30)
        assert np.all(np.asarray(ours.steps_per_block)[: int(ours.num_blocks)] == config.max_denoising_steps)
    else:
        ours = generate(model, *prompts, tape, config.replace(greedy=True))
        expected = reference_generate(reference, prompts, config, tape=tape, greedy=True)
    assert_same(ours, *expected)


# ---------------------------------------------------------------------------------------------- invariances
def test_a_key_is_its_noise_tape(models, prompts):
    _, model = models
    from_key = generate(model, *prompts, jax.random.key(7), THREE_BLOCKS)
    from_tape = generate(model, *prompts, tape_for(THREE_BLOCKS, seed=7), THREE_BLOCKS)
    np.testing.assert_array_equal(from_key.sequences(), from_tape.sequences())
    other_key = generate(model, *prompts, jax.random.key(8), THREE_BLOCKS)
    assert not np.array_equal(other_key.sequences(), from_key.sequences())


def test_a_row_does_not_depend_on_its_batch_neighbours(models, prompts):
    _, model = models
    ids, mask = prompts
    first = generate(model, ids, mask, jax.random.key(3), THREE_BLOCKS)
    swapped = ids.copy()
    swapped[1, -3:] = [100, 101, 102]
    second = generate(model, swapped, mask, jax.random.key(3), THREE_BLOCKS)
    np.testing.assert_array_equal(first.sequences()[0], second.sequences()[0])
    assert not np.array_equal(first.sequences()[1], second.sequences()[1])


def test_all_accepting_limits_of_the_three_rules_agree(models, prompts):
    """A huge entropy bound, k = C and a vanishing confidence threshold each accept every position."""
    _, model = models
    tape = tape_for(THREE_BLOCKS, seed=4)
    results = [generate(model, *prompts, tape, THREE_BLOCKS.replace(**changes)).sequences()
               for changes in (dict(entropy_bound=1e6), dict(acceptance="top_k", accept_top_k=CANVAS),
                               dict(acceptance="confidence", accept_confidence=1e-30))]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


@pytest.mark.parametrize("acceptance", ["top_k", "confidence", "margin"])
def test_top_k_and_confidence_accept_what_they_promise(models, prompts, acceptance):
    _, model = models
    config = ONE_BLOCK.replace(t_min=0.4, t_max=0.8, acceptance=acceptance, accept_top_k=3, accept_confidence=0.5)
    result = RECORDER.run(model, prompts, jax.random.key(5), config)
    assert result.total_steps() == len(RECORDER.steps) > 1  # the result first: its callbacks have all run then
    for event in RECORDER.steps:
        counts = event.accepted.sum(-1)
        if acceptance == "top_k":
            assert np.all(counts == 3)
        else:
            assert np.all(counts >= 1)


def test_switching_strategies_reuses_the_compiled_program(models, prompts):
    """Strategy, thresholds (stability 0-2 share a history), EOS lists (up to 4) and pad are traced values."""
    _, model = models
    generate(model, *prompts, jax.random.key(0), THREE_BLOCKS)
    compiled = sampler_lib._generate_jit._cache_size()
    for changes in (dict(acceptance="top_k", greedy=True), dict(acceptance="confidence", early_stop=False),
                    dict(acceptance="margin", accept_margin=0.5),
                    dict(stability_threshold=0, eos_token_ids=(3, 4, 5), pad_token_id=None, t_min=0.1)):
        generate(model, *prompts, jax.random.key(0), THREE_BLOCKS.replace(**changes))
    assert sampler_lib._generate_jit._cache_size() == compiled


def test_default_top_k():
    config = SamplerConfig(max_denoising_steps=48)
    assert config.top_k(256) == 6 and config.top_k(8) == 1 and config.replace(accept_top_k=99).top_k(8) == 8


# ------------------------------------------------------------------------------------------------ settings
def test_from_generation_config(tmp_path):
    released = {"max_new_tokens": 256, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
                "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
                "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1, 106, 50],
                "pad_token_id": 0, "return_dict_in_generate": True, "transformers_version": "5.23.0"}
    config = SamplerConfig.from_generation_config(released)
    assert config == SamplerConfig(eos_token_ids=(1, 106, 50), pad_token_id=0)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"max_denoising_steps": 12, "t_min": None, "sampler_config": None, "eos_token_id": 1}))
    from_dir = SamplerConfig.from_generation_config(str(tmp_path), greedy=True)
    assert (from_dir.max_denoising_steps, from_dir.t_min, from_dir.entropy_bound) == (12, 0.4, 0.1)
    assert from_dir.eos_token_ids == (1,) and from_dir.pad_token_id is None and from_dir.greedy
    assert SamplerConfig.from_generation_config(str(tmp_path / "generation_config.json")) == dataclasses.replace(
        from_dir, greedy=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert SamplerConfig.from_generation_config(str(empty)) == SamplerConfig()


def test_config_validation():
    with pytest.raises(ValueError, match="acceptance"):
        SamplerConfig(acceptance="nucleus")
    with pytest.raises(ValueError, match="t_min"):
        SamplerConfig(t_min=0.9, t_max=0.8)
    with pytest.raises(ValueError, match="t_max > 0"):
        SamplerConfig(t_min=0.0, t_max=0.0)
    assert SamplerConfig(t_min=1.5, t_max=1.5).t_min == 1.5  # one constant temperature is allowed
    with pytest.raises(ValueError, match="stability_threshold"):
        SamplerConfig(stability_threshold=-1)
    assert SamplerConfig(max_new_tokens=257).num_blocks(256) == 2


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
    with pytest.raises(ValueError, match="length"):
        left_pad([[1, 2, 3]], 0, length=2)


def test_bad_inputs_are_named(models, prompts):
    _, model = models
    wrong_tape = tape_for(ONE_BLOCK, seed=0)
    with pytest.raises(ValueError, match="NoiseTape shapes"):
        generate(model, *prompts, wrong_tape, THREE_BLOCKS)
    with pytest.raises(ValueError, match="initial_canvas"):
        generate(model, *prompts, jax.random.key(0), THREE_BLOCKS, initial_canvas=jnp.zeros((2, 3), jnp.int32))
